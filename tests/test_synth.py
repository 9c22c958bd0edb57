"""The synthetic multimodal KG: determinism, counts, faults, knobs, and that test needs images."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from elmm_ray.config.schema import SynthConfig
from elmm_ray.data.synth import (
    ATTRIBUTES,
    IN_PROGRESS_NAME,
    MANIFEST_NAME,
    TEXT_FILES,
    TRUTH_NAME,
    generate_synthetic_kg,
    synth_from_config,
)

SMALL = dict(num_entities=40, image_size=16, max_images=3)


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file (and the name of every folder) under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


def read_triples(root: Path, name: str) -> list[tuple[str, str, str]]:
    text = (root / name).read_text()
    assert text == "" or text.endswith("\n")
    return [tuple(line.split("\t")) for line in text.splitlines()]


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "clean"
    generate_synthetic_kg(out)
    return out


@pytest.fixture(scope="module")
def faulty(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "faulty"
    generate_synthetic_kg(out, inject_faults=True)
    return out


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    generate_synthetic_kg(tmp_path / "a", inject_faults=True, seed=3, **SMALL)
    generate_synthetic_kg(tmp_path / "b", inject_faults=True, seed=3, **SMALL)
    generate_synthetic_kg(tmp_path / "c", inject_faults=True, seed=4, **SMALL)
    a, b, c = (file_hashes(tmp_path / x) for x in "abc")
    assert len(a) > 20 and a == b
    assert a != c
    # Relation texts do not depend on the seed; entities, names and triples do.
    assert all(a[n] != c[n] for n in ("entity2text.txt", "train.tsv", "dev.tsv", "test.tsv"))


def test_manifest_counts_match_files(clean):
    manifest = load_json(clean / MANIFEST_NAME)
    counts = manifest["counts"]
    assert manifest["params"]["num_entities"] == 300 and manifest["faults"] == []
    assert not (clean / IN_PROGRESS_NAME).exists()
    entities = [ln.split("\t")[0] for ln in (clean / "entity2text.txt").read_text().splitlines()]
    relations = [ln.split("\t")[0] for ln in (clean / "relation2text.txt").read_text().splitlines()]
    assert len(entities) == len(set(entities)) == counts["entities"] == 300
    assert len(relations) == counts["relations"] == 6
    assert counts["values"] + counts["objects"] == 300
    for split in ("train", "dev", "test"):
        rows = read_triples(clean, f"{split}.tsv")
        assert len(rows) == counts["triples"][split] > 0
        assert {h for h, _, _ in rows} | {t for _, _, t in rows} <= set(entities)
        assert {r for _, r, _ in rows} <= set(relations)
    on_disk = sorted(p.relative_to(clean).as_posix() for p in (clean / "images").rglob("*.*"))
    assert len(on_disk) == counts["images_written"]
    truth = load_json(clean / TRUTH_NAME)
    assert sorted(p for e in truth["entities"].values() for p in e["images"]) == on_disk
    assert (
        sum(1 for e in truth["entities"].values() if not e["images"])
        == counts["entities_without_images"]
    )
    # Every folder is named after an entity id and every picture decodes at the set size.
    assert {p.name for p in (clean / "images").iterdir()} <= set(entities)
    with Image.open(clean / on_disk[0]) as img:
        assert img.size == (64, 64) and img.mode == "RGB"


def test_faults_sit_beside_unchanged_good_images(clean, faulty):
    faults = load_json(faulty / MANIFEST_NAME)["faults"]
    expected = {
        "truncated_png": "bad",
        "truncated_jpeg": "bad",
        "zero_bytes": "bad",
        "one_pixel": "bad",
        "text_as_jpeg": "bad",
        "cmyk_jpeg": "convertible",
        "gray_alpha_png": "convertible",
        "empty_folder": "empty_folder",
    }
    assert {f["kind"]: f["expected"] for f in faults} == expected
    by_kind = {f["kind"]: f for f in faults}
    for f in faults:
        assert f["path"].startswith(f"images/{f['entity']}")
    path = {kind: faulty / f["path"] for kind, f in by_kind.items()}

    assert path["zero_bytes"].stat().st_size == 0
    assert path["text_as_jpeg"].suffix == ".jpg"
    with pytest.raises(Image.UnidentifiedImageError):
        Image.open(path["text_as_jpeg"])
    for kind in ("truncated_png", "truncated_jpeg"):
        with pytest.raises(OSError):
            with Image.open(path[kind]) as img:
                img.load()
    with Image.open(path["one_pixel"]) as img:
        assert img.size == (1, 1)
    for kind, mode in (("cmyk_jpeg", "CMYK"), ("gray_alpha_png", "LA")):
        with Image.open(path[kind]) as img:
            assert img.mode == mode and img.size == (64, 64)
            assert img.convert("RGB").size == (64, 64)
    assert path["empty_folder"].is_dir() and not any(path["empty_folder"].iterdir())

    # The graph is the same; every good picture is still there, byte for byte, except those
    # withheld to leave the empty folder empty.
    for name in TEXT_FILES:
        assert (clean / name).read_bytes() == (faulty / name).read_bytes()
    good, bad = file_hashes(clean / "images"), file_hashes(faulty / "images")
    empty = by_kind["empty_folder"]["entity"]
    withheld = [p for p in good if p.startswith(f"{empty}/")]
    assert len(withheld) == by_kind["empty_folder"]["withheld_images"]
    assert all(bad[p] == h for p, h in good.items() if p not in withheld)
    counts_clean = load_json(clean / MANIFEST_NAME)["counts"]
    counts_faulty = load_json(faulty / MANIFEST_NAME)["counts"]
    assert counts_faulty["images_written"] == (
        counts_clean["images_written"] - by_kind["empty_folder"]["withheld_images"]
    )


def test_image_count_knobs(tmp_path):
    generate_synthetic_kg(
        tmp_path / "a",
        num_entities=60,
        image_size=16,
        min_images=2,
        max_images=3,
        no_image_fraction=0.5,
    )
    truth = load_json(tmp_path / "a" / TRUTH_NAME)["entities"]
    objects = [e for e in truth.values() if e["kind"] == "object"]
    without = [e for e in objects if not e["images"]]
    assert len(without) == round(0.5 * len(objects))
    for e in truth.values():
        if e in without:
            continue
        assert 2 <= len(e["images"]) <= 3
        assert all((tmp_path / "a" / p).is_file() for p in e["images"])
    # An object without pictures holds nothing out: its triples cannot be inferred.
    assert all(e["held_out"] is None for e in without)

    report = generate_synthetic_kg(
        tmp_path / "b",
        min_images=0,
        max_images=0,
        **{k: v for k, v in SMALL.items() if k != "max_images"},
    )
    assert report.images_written == 0 and not (tmp_path / "b" / "images").exists()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_entities": 7}, "num_entities"),
        ({"num_entities": 30.0}, "num_entities"),
        ({"num_relations": 1}, "num_relations"),
        ({"num_relations": 500}, "num_relations"),
        ({"min_images": -1}, "min_images"),
        ({"max_images": 11}, "max_images"),
        ({"min_images": 3, "max_images": 2}, "min_images"),
        ({"image_size": 8}, "image_size"),
        ({"no_image_fraction": 1.5}, "no_image_fraction"),
        ({"inject_faults": 1}, "inject_faults"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_name_the_argument(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        generate_synthetic_kg(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_test_split_needs_the_images(clean):
    truth = load_json(clean / TRUTH_NAME)
    entities, relations = truth["entities"], truth["relations"]
    train = read_triples(clean, "train.tsv")
    held = read_triples(clean, "dev.tsv") + read_triples(clean, "test.tsv")
    test = read_triples(clean, "test.tsv")
    known = set(train) | set(held)

    def attribute_of(rel: str) -> str:
        return relations[rel]["attribute"]

    # Dev/test hold attribute triples only, of heads that have pictures and appear in train,
    # and no (head, relation) pair of dev/test is answered in train.
    train_pairs = {(h, r) for h, r, _ in train}
    train_entities = {h for h, _, _ in train} | {t for _, _, t in train}
    for h, r, t in held:
        assert relations[r]["kind"] == "attribute"
        assert entities[h]["images"] and h in train_entities and t in train_entities
        assert (h, r) not in train_pairs
        assert entities[h]["held_out"]["attribute"] == attribute_of(r)
    # Object-object relations never touch a held-out attribute of either end.
    for h, r, t in train:
        if relations[r]["kind"] == "object":
            for e in (h, t):
                assert (entities[e]["held_out"] or {}).get("attribute") != attribute_of(r)
    # Names are opaque.
    words = {w for values in ATTRIBUTES.values() for w in values}
    assert not any(w in e["name"].lower() for e in entities.values() for w in words)

    # An oracle that sees the head's attributes (what its pictures show) is always right...
    value_entity = {
        (e["attribute"], e["value"]): eid for eid, e in entities.items() if e["kind"] == "value"
    }

    def oracle(h: str, r: str) -> str:
        a = attribute_of(r)
        return value_entity[(a, entities[h]["attributes"][a])]

    assert all(oracle(h, r) == t for h, r, t in held)
    # ... and ranks the true head first for head prediction once known triples are filtered.
    for h, r, t in test:
        a = attribute_of(r)
        candidates = {
            o
            for o, e in entities.items()
            if e["kind"] == "object"
            and e["attributes"][a] == entities[t]["value"]
            and (o == h or (o, r, t) not in known)
        }
        assert candidates == {h}

    # ... while the structure alone (most frequent train tail of the relation) is not.
    most_frequent = {
        r: Counter(t for _, r2, t in train if r2 == r).most_common(1)[0][0]
        for r in {r for _, r, _ in test}
    }
    hits1 = sum(most_frequent[r] == t for _, r, t in test) / len(test)
    assert len(test) > 100 and hits1 < 0.4


def test_existing_directory_is_reused_or_refused(tmp_path):
    out = tmp_path / "kg"
    first = generate_synthetic_kg(out, **SMALL)
    stamp = (out / MANIFEST_NAME).stat().st_mtime_ns
    again = generate_synthetic_kg(out, **SMALL)
    assert again.skipped and not first.skipped
    assert (again.triples, again.images_written) == (first.triples, first.images_written)
    assert (out / MANIFEST_NAME).stat().st_mtime_ns == stamp

    with pytest.raises(FileExistsError, match="seed"):
        generate_synthetic_kg(out, seed=1, **SMALL)
    picture = next((out / "images").rglob("*.*"))
    picture.unlink()
    with pytest.raises(FileExistsError, match="damaged"):
        generate_synthetic_kg(out, **SMALL)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_synthetic_kg(foreign, **SMALL)

    # An interrupted run (marker, no manifest) is cleared and redone.
    (out / MANIFEST_NAME).unlink()
    (out / IN_PROGRESS_NAME).write_text("{}")
    redone = generate_synthetic_kg(out, **SMALL)
    assert not redone.skipped and redone.images_written == first.images_written
    assert picture.is_file()


def test_from_config_and_tiny_graph(tmp_path):
    cfg = SynthConfig(num_entities=8, image_size=16, inject_faults=True, seed=5)
    report = synth_from_config(cfg, tmp_path / "a")
    assert report.num_entities == 8 and report.num_relations == cfg.num_relations
    assert len(report.faults) == 8
    direct = generate_synthetic_kg(
        tmp_path / "b", num_entities=8, image_size=16, inject_faults=True, seed=5
    )
    assert file_hashes(tmp_path / "a") == file_hashes(tmp_path / "b")
    assert direct.triples == report.triples
    truth = load_json(tmp_path / "a" / TRUTH_NAME)["entities"]
    train_tails = {t for _, _, t in read_triples(tmp_path / "a", "train.tsv")}
    assert {e for e, v in truth.items() if v["kind"] == "value"} <= train_tails


def saturated_colour(root: Path, pictures: list[str]) -> np.ndarray:
    """Median RGB of the coloured (saturated) pixels of some pictures: grey ones are ignored."""
    pixels = []
    for p in pictures:
        with Image.open(root / p) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.int16).reshape(-1, 3)
        pixels.append(rgb[rgb.max(axis=1) - rgb.min(axis=1) > 70])
    return np.median(np.concatenate(pixels), axis=0)


def test_colour_can_be_read_off_the_pictures(clean):
    """Without the truth: match the head's shape colour to the value entities' swatches."""
    truth = load_json(clean / TRUTH_NAME)
    entities = truth["entities"]
    colour_rel = next(r for r, v in truth["relations"].items() if v["attribute"] == "colour")
    train = read_triples(clean, "train.tsv")
    swatches = {t for _, r, t in train if r == colour_rel}
    swatch_rgb = {t: saturated_colour(clean, entities[t]["images"]) for t in swatches}
    queries = [(h, t) for h, r, t in read_triples(clean, "test.tsv") if r == colour_rel]
    hits = 0
    for h, t in queries:
        rgb = saturated_colour(clean, entities[h]["images"])
        hits += min(swatch_rgb, key=lambda s: np.abs(swatch_rgb[s] - rgb).sum()) == t
    assert len(queries) > 20 and hits / len(queries) > 0.9

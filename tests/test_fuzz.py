"""Bad input: a representative subset of the mutation matrix of tests/fuzz.py (the whole of
it is bench/bench_fuzz.py) and the rules each loader keeps."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from elmm_ray.config import ConfigError, load_config
from elmm_ray.data.kg import DatasetError, load_kg
from elmm_ray.data.shards import validate_image
from elmm_ray.models.backbone import preprocess_images
from tests import fuzz

SUBSET = ["bom", "utf16", "latin1", "crlf", "whitespace_lines", "extra_column",
          "missing_column", "unknown_id", "wrong_count", "long_line", "empty"]


@pytest.mark.parametrize("layout,file", [("mkgformer", "test.tsv"),
                                         ("mkgformer", "entity2text.txt"),
                                         ("openke", "train2id.txt"),
                                         ("openke", "entity2id.txt"),
                                         ("mygo", "entities.txt"), ("mygo", "entity2id.txt")])
def test_dataset_mutations_warn_or_fail_cleanly(tmp_path, layout, file):
    cases = list(fuzz.dataset_cases(tmp_path, seeds=1, layouts=(layout,), mutations=SUBSET,
                                    files=[file]))
    assert len(cases) >= 9
    bad = [(c.mutation, c.outcome, c.message) for c in cases
           if c.outcome in ("crashed", "silent")]
    assert not bad
    for c in cases:
        if c.mutation in ("bom", "crlf"):
            assert c.outcome == "loaded_same", c
        if c.mutation in ("utf16", "latin1"):
            assert c.outcome == "failed" and c.warnings == 1, c  # file:line in the message


@pytest.mark.parametrize("kind", ["config", "space"])
def test_yaml_mutations_fail_with_file_line_or_key(tmp_path, kind):
    cases = list(fuzz.yaml_cases(tmp_path, kind, seeds=1))
    assert len(cases) == len(fuzz.YAML_MUTATIONS)
    assert not [c for c in cases if c.outcome == "crashed"]
    outcome = {c.mutation: c for c in cases}
    for name in ("utf16", "latin1", "tab_indent", "duplicate_key", "missing_colon"):
        assert outcome[name].outcome == "failed" and outcome[name].warnings == 1, outcome[name]
    assert outcome["bom"].outcome == outcome["crlf"].outcome == "loaded_same"


def test_unseen_entities_and_relations_are_counted_and_reported(tmp_path):
    files = fuzz.layout_files("mkgformer")
    files["test.tsv"] += "/m/new\t/r/new\t/m/0e1\n"
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    kg = load_kg(tmp_path)
    assert kg.num_entities == fuzz.N_ENT + 1  # kept, not dropped
    assert kg.stats()["unseen_in_train"] == {"entities": 1, "relations": 1}
    assert any("1 entities appear only in valid/test" in w and "/m/new" in w
               for w in kg.report.warnings)
    rc, err = fuzz.run_cli(["stats", str(tmp_path)])
    assert rc == 0 and not err


def test_encoding_errors_name_file_line_and_the_fix(tmp_path):
    files = fuzz.layout_files("mkgformer")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    lines = files["dev.tsv"].splitlines()
    lines[2] += " caf\xe9"
    (tmp_path / "dev.tsv").write_bytes("\n".join(lines).encode("latin-1"))
    with pytest.raises(DatasetError, match=r"dev\.tsv:3: not UTF-8 .*iconv"):
        load_kg(tmp_path)
    (tmp_path / "dev.tsv").write_bytes(files["dev.tsv"].encode("utf-16"))
    with pytest.raises(DatasetError, match=r"dev\.tsv:1: UTF-16 text"):
        load_kg(tmp_path)
    rc, err = fuzz.run_cli(["stats", str(tmp_path)])
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_mygo_wrong_count_line_is_reported(tmp_path):
    files = fuzz.layout_files("mygo")
    files["entity2id.txt"] = "99\n" + files["entity2id.txt"].split("\n", 1)[1]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    kg = load_kg(tmp_path)
    assert any(f"count line says 99 rows but {fuzz.N_ENT} follow" in w
               for w in kg.report.warnings)


def test_yaml_duplicate_key_and_encoding(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\ntrain:\n  epochs: 2\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:4:3: not valid YAML: key 'epochs' "
                       r"appears twice \(first at line 3\)"):
        load_config(path)
    path.write_bytes("seed: 1\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"c\.yaml:2: not UTF-8 text"):
        load_config(path)
    with pytest.raises(ConfigError, match="is a folder, not a file"):
        load_config(tmp_path)


@pytest.mark.parametrize("mutation,seed,data", list(fuzz.image_inputs(seeds=1)))
def test_images_are_packed_or_left_out_with_a_reason(mutation, seed, data):
    case = fuzz.judge_image(mutation, seed, data)
    assert case.outcome in ("failed", "loaded_same"), case
    expected = {"huge_declared": "decompression bomb", "random_bytes": "not a recognised",
                "empty": "empty file", "tiny": "degenerate size"}
    if mutation in expected:
        assert case.outcome == "failed" and case.message.startswith(expected[mutation])
    if mutation in ("exif_orientation", "palette_transparency", "16_bit"):
        assert case.outcome == "loaded_same"


def test_exif_orientation_is_applied_before_the_vision_tower():
    info, _ = validate_image(fuzz.exif_jpeg(6), 8)
    assert info["orientation"] == 6 and (info["width"], info["height"]) == (48, 32)
    rotated = preprocess_images([Image.open(io.BytesIO(fuzz.exif_jpeg(6)))], 32)
    plain = Image.open(io.BytesIO(fuzz.exif_jpeg(1)))
    upright = preprocess_images([plain.transpose(Image.Transpose.ROTATE_270)], 32)
    assert np.allclose(rotated.numpy(), upright.numpy(), atol=1e-5)
    assert not np.allclose(rotated.numpy(), preprocess_images([plain], 32).numpy(), atol=0.1)

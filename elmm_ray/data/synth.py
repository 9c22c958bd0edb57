"""A deterministic synthetic multimodal knowledge graph in the MKGformer file layout.

It lets every stage (loaders, pack, extract, train, prune, eval) run without real data and
gives a graph whose test split can only be answered by looking at the pictures.

Design:

- *Object* entities carry hidden visual attributes (colour, shape, count of shapes, and a
  background pattern), drawn with PIL in every picture of the object with per-image
  variation (position, size, rotation, colour jitter, background tone and noise).
- *Value* entities, one per attribute value (e.g. "the colour red"), whose pictures show
  only that value (a colour swatch, a lone grey shape, n grey dots, the bare pattern).
- Every name is opaque gibberish ("Zorvak Tesh"); attribute words never appear in text.
- Attribute relations ``object --has colour--> value`` come first; any further relations
  link objects whose attribute values are equal or shifted (``same shape as``, ...).
- Every object with pictures holds out exactly one attribute triple into dev or test; the
  object's other attribute triples stay in train, and the object-object relations never
  touch a held-out attribute of either end. So the held-out value is written nowhere in
  train or text: only the head's pictures show it, and a structure-only model sits near
  chance among the attribute's values while the attribute oracle is always right.

``synth_truth.json`` holds the hidden attributes (for analysis and tests; the model never
reads it); ``synth_manifest.json`` is written last and marks a complete dataset.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from elmm_ray.data.synth_images import ATTRIBUTES, write_faults, write_images

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "synth_manifest.json"
TRUTH_NAME = "synth_truth.json"
IN_PROGRESS_NAME = ".synth_in_progress"
TEXT_FILES = ("entity2text.txt", "relation2text.txt", "train.tsv", "dev.tsv", "test.tsv")
SPLIT_FILES = {"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"}

TAILS_PER_HEAD = 2  # tails sampled per head of an object-object relation
JPEG_SHARE = 0.25  # share of entities whose pictures are JPEG (the rest PNG)
MAX_IMAGES = 10

# Independent random streams, so that e.g. faults never shift the good pictures.
_PLAN = 1  # the plan's random stream (pictures and faults: see synth_images)

_ONSETS = tuple("b d f g h k l m n p r s t v z br dr gr kr tr vr zh sh th".split())
_VOWELS = tuple("a e i o u ae ei ou ya".split())
_CODAS = ("", "", "", *"k l n r s sh th x z".split())
_BANNED_IN_NAMES = tuple(
    {w for values in ATTRIBUTES.values() for w in values} | set(ATTRIBUTES) | {"color"}
)


@dataclass
class SynthReport:
    """What a generator call wrote (or found already written, then ``skipped`` is True)."""

    out_dir: Path
    num_entities: int
    num_relations: int
    triples: dict[str, int]
    images_written: int
    faults: list[dict] = field(default_factory=list)
    skipped: bool = False


@dataclass(frozen=True)
class _Relation:
    rid: str
    text: str
    attribute: str
    offset: int | None  # None: object -> value entity; else object -> object, value + offset


@dataclass
class _Plan:
    """Everything about the graph except the pixels."""

    ids: list[str]  # internal index -> entity id; values first, then objects
    names: list[str]
    attr_counts: dict[str, int]  # number of values of each attribute
    used: list[str]  # attributes that have an attribute relation
    value_of: list[tuple[str, int]]  # value entity -> (attribute, value index)
    value_index: dict[tuple[str, int], int]  # (attribute, value index) -> entity
    object_attrs: np.ndarray  # (num_objects, 4) value index per attribute
    num_images: np.ndarray  # (num_entities,) good pictures per entity
    jpeg: np.ndarray  # (num_entities,) bool
    relations: list[_Relation]
    held_out: dict[int, tuple[str, str]]  # object entity -> (attribute, split)
    empty_folder: int  # entity whose folder is left empty when faults are injected
    triples: dict[str, list[tuple[str, str, str]]]

    @property
    def num_values(self) -> int:
        return len(self.value_of)

    def attrs_of(self, entity: int) -> dict[str, int]:
        row = self.object_attrs[entity - self.num_values]
        return {a: int(v) for a, v in zip(ATTRIBUTES, row)}


# ---------------------------------------------------------------------------- public API


def generate_synthetic_kg(
    out_dir: str | os.PathLike,
    *,
    num_entities: int = 300,
    num_relations: int = 6,
    min_images: int = 1,
    max_images: int = 4,
    image_size: int = 64,
    no_image_fraction: float = 0.0,
    inject_faults: bool = False,
    seed: int = 0,
) -> SynthReport:
    """Write a synthetic multimodal KG into ``out_dir`` (see the module docstring).

    The same arguments give byte-identical files. A directory that already holds a complete
    dataset with the same arguments is left as it is; any other non-empty directory is an
    error (files are never mixed).
    """
    params = _validate(
        num_entities=num_entities,
        num_relations=num_relations,
        min_images=min_images,
        max_images=max_images,
        image_size=image_size,
        no_image_fraction=no_image_fraction,
        inject_faults=inject_faults,
        seed=seed,
    )
    out = Path(out_dir)
    existing = _check_out_dir(out, params)
    if existing is not None:
        return existing

    plan = _make_plan(**params)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / IN_PROGRESS_NAME, {"params": params})
    _write_text_files(out, plan)
    images, written = write_images(out, plan, image_size, seed, inject_faults)
    faults = write_faults(out, plan, image_size, seed, written) if inject_faults else []
    _write_json(out / TRUTH_NAME, _truth(plan, images))

    counts = {
        "entities": len(plan.ids),
        "objects": len(plan.ids) - plan.num_values,
        "values": plan.num_values,
        "relations": len(plan.relations),
        "attribute_relations": len(plan.used),
        "triples": {s: len(t) for s, t in plan.triples.items()},
        "images_written": sum(len(v) for v in images.values()),
        "entities_without_images": sum(1 for v in images.values() if not v),
    }
    manifest = {
        "generator": "elmm_ray.data.synth",
        "format_version": FORMAT_VERSION,
        "params": params,
        "counts": counts,
        "faults": faults,
    }
    _write_json(out / MANIFEST_NAME, manifest)  # last: its presence marks a complete dataset
    (out / IN_PROGRESS_NAME).unlink()
    report = _report(out, manifest, skipped=False)
    log.info(
        "synthetic KG in %s: %d entities (%d objects, %d values), %d relations, "
        "triples train/dev/test %d/%d/%d, %d images, %d faults",
        out,
        counts["entities"],
        counts["objects"],
        counts["values"],
        counts["relations"],
        report.triples["train"],
        report.triples["dev"],
        report.triples["test"],
        report.images_written,
        len(faults),
    )
    return report


def synth_from_config(synth_cfg: Any, out_dir: str | os.PathLike) -> SynthReport:
    """:func:`generate_synthetic_kg` with the fields of a ``SynthConfig``."""
    return generate_synthetic_kg(
        out_dir,
        num_entities=synth_cfg.num_entities,
        num_relations=synth_cfg.num_relations,
        min_images=synth_cfg.min_images,
        max_images=synth_cfg.max_images,
        image_size=synth_cfg.image_size,
        no_image_fraction=synth_cfg.no_image_fraction,
        inject_faults=synth_cfg.inject_faults,
        seed=synth_cfg.seed,
    )


# ---------------------------------------------------------------------------- validation


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _validate(**p: Any) -> dict[str, Any]:
    """Check every argument; return them as plain JSON values (the manifest's ``params``)."""

    def need_int(name: str, lo: int, hi: int | None = None) -> int:
        v = p[name]
        bounds = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        if not _is_int(v) or v < lo or (hi is not None and v > hi):
            raise ValueError(f"{name} must be an integer {bounds}, got {v!r}")
        return int(v)

    out: dict[str, Any] = {
        "num_entities": need_int("num_entities", 8),
        "num_relations": need_int("num_relations", 2),
        "min_images": need_int("min_images", 0, MAX_IMAGES),
        "max_images": need_int("max_images", 0, MAX_IMAGES),
        "image_size": need_int("image_size", 16, 1024),
    }
    if out["min_images"] > out["max_images"]:
        raise ValueError(
            f"min_images ({out['min_images']}) must be <= max_images ({out['max_images']})"
        )
    frac = p["no_image_fraction"]
    if (
        isinstance(frac, bool)
        or not isinstance(frac, (int, float, np.floating))
        or not (0.0 <= float(frac) <= 1.0)
    ):
        raise ValueError(f"no_image_fraction must be a number in [0, 1], got {frac!r}")
    out["no_image_fraction"] = float(frac)
    if not isinstance(p["inject_faults"], bool):
        raise ValueError(f"inject_faults must be True or False, got {p['inject_faults']!r}")
    out["inject_faults"] = p["inject_faults"]
    out["seed"] = need_int("seed", 0)
    n_attr, counts = _attribute_layout(out["num_entities"], out["num_relations"])
    most = n_attr + sum(counts.values())
    if out["num_relations"] > most:
        raise ValueError(
            f"num_relations must be <= {most} with num_entities={out['num_entities']} "
            f"({n_attr} attribute + {most - n_attr} object-object relations), "
            f"got {out['num_relations']}"
        )
    return out


def _attribute_layout(num_entities: int, num_relations: int) -> tuple[int, dict[str, int]]:
    """How many attribute relations, and how many values each attribute has.

    Value entities take at most a third of the graph: small graphs get fewer values per
    attribute (down to 2) and, if still too many, fewer attribute relations (down to 2).
    """
    names = list(ATTRIBUTES)
    counts = {a: len(v) for a, v in ATTRIBUTES.items()}
    n_attr = min(num_relations, len(names))
    budget = max(4, num_entities // 3)
    while sum(counts[a] for a in names[:n_attr]) > budget:
        reducible = [a for a in names[:n_attr] if counts[a] > 2]
        if reducible:
            counts[max(reducible, key=lambda a: counts[a])] -= 1
        else:
            n_attr -= 1
    for a in names[n_attr:]:
        counts[a] = len(ATTRIBUTES[a])
    return n_attr, counts


# ---------------------------------------------------------------------------- output dir


def _check_out_dir(out: Path, params: dict[str, Any]) -> SynthReport | None:
    """The report of a finished identical dataset in ``out``, None if ``out`` is free.

    An interrupted run of this generator (in-progress marker, no manifest) is cleared;
    anything else that is not an identical complete dataset raises FileExistsError.
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return None
    manifest_path = out / MANIFEST_NAME
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("format_version") != FORMAT_VERSION or manifest.get("params") != params:
            old = manifest.get("params", {})
            diff = (
                ", ".join(
                    f"{k}: {old.get(k)!r} there, {v!r} asked"
                    for k, v in params.items()
                    if old.get(k) != v
                )
                or f"format_version {manifest.get('format_version')!r} != {FORMAT_VERSION}"
            )
            raise FileExistsError(
                f"{out} holds a synthetic dataset made with other parameters ({diff}); "
                "use another directory or delete this one"
            )
        problem = _incomplete(out, manifest)
        if problem:
            raise FileExistsError(
                f"{out} holds a damaged synthetic dataset ({problem}); delete it and rerun"
            )
        log.info("synthetic KG in %s already complete with the same parameters: skipped", out)
        return _report(out, manifest, skipped=True)
    if (out / IN_PROGRESS_NAME).is_file():
        log.warning("%s holds an interrupted synthetic dataset: removing it and starting over", out)
        for name in (*TEXT_FILES, TRUTH_NAME, IN_PROGRESS_NAME):
            (out / name).unlink(missing_ok=True)
            (out / f"{name}.tmp").unlink(missing_ok=True)
        (out / f"{MANIFEST_NAME}.tmp").unlink(missing_ok=True)
        shutil.rmtree(out / "images", ignore_errors=True)
        if not any(out.iterdir()):
            return None
    sample = sorted(p.name for p in out.iterdir())[:5]
    raise FileExistsError(
        f"{out} is not empty and holds no synthetic dataset (found {sample}); "
        "use an empty or new directory"
    )


def _incomplete(out: Path, manifest: dict[str, Any]) -> str:
    """Why a dataset with a manifest is not complete ('' when it is)."""
    for name in (*TEXT_FILES, TRUTH_NAME):
        if not (out / name).is_file():
            return f"{name} is missing"
    fault_files = sum(1 for f in manifest["faults"] if f["expected"] != "empty_folder")
    expected = manifest["counts"]["images_written"] + fault_files
    found = sum(len(files) for _, _, files in os.walk(out / "images"))
    if found != expected:
        return f"{found} files under images/, the manifest says {expected}"
    return ""


def _report(out: Path, manifest: dict[str, Any], *, skipped: bool) -> SynthReport:
    counts = manifest["counts"]
    return SynthReport(
        out_dir=out,
        num_entities=counts["entities"],
        num_relations=counts["relations"],
        triples=dict(counts["triples"]),
        images_written=counts["images_written"],
        faults=list(manifest["faults"]),
        skipped=skipped,
    )


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- the graph


def _make_names(count: int, seed: int) -> list[str]:
    """Unique pronounceable gibberish names that contain no attribute word."""
    rnd = random.Random(seed)

    def word(syllables: int) -> str:
        return "".join(
            rnd.choice(_ONSETS) + rnd.choice(_VOWELS) + rnd.choice(_CODAS) for _ in range(syllables)
        ).capitalize()

    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        name = f"{word(rnd.randint(2, 3))} {word(rnd.randint(1, 2))}"
        low = name.lower()
        if low in seen or any(b in low for b in _BANNED_IN_NAMES):
            continue
        seen.add(low)
        names.append(name)
    return names


def _make_plan(
    *,
    num_entities: int,
    num_relations: int,
    min_images: int,
    max_images: int,
    image_size: int,
    no_image_fraction: float,
    inject_faults: bool,
    seed: int,
) -> _Plan:
    """Entities, attributes, relations and split triples (independent of inject_faults)."""
    rng = np.random.default_rng([seed, _PLAN])
    n_attr, counts = _attribute_layout(num_entities, num_relations)
    attr_names = list(ATTRIBUTES)
    used = attr_names[:n_attr]
    value_of = [(a, v) for a in used for v in range(counts[a])]
    value_index = {av: i for i, av in enumerate(value_of)}
    n_values = len(value_of)
    n_objects = num_entities - n_values
    objects = range(n_values, num_entities)

    width = max(5, len(str(num_entities - 1)))
    ids = [f"E{i:0{width}d}" for i in rng.permutation(num_entities)]
    names = _make_names(num_entities, seed)

    # Attributes: i.i.d. uniform; only in tiny graphs a value no object has is forced onto
    # an object whose value is shared, so that every value entity has triples.
    object_attrs = np.stack(
        [rng.integers(0, counts[a], size=n_objects) for a in attr_names], axis=1
    )
    for j, a in enumerate(used):
        col = object_attrs[:, j]
        for v in range(counts[a]):
            if not (col == v).any():
                shared = [i for i in range(n_objects) if (col == col[i]).sum() > 1]
                col[shared[int(rng.integers(len(shared)))]] = v

    num_images = rng.integers(min_images, max_images + 1, size=num_entities)
    n_no_images = int(round(no_image_fraction * n_objects))
    if n_no_images:
        num_images[rng.choice(np.arange(n_values, num_entities), n_no_images, replace=False)] = 0
    jpeg = rng.random(num_entities) < JPEG_SHARE

    relations = [_Relation(f"R{j:02d}", f"has {a}", a, None) for j, a in enumerate(used)]
    extra = [(a, d) for d in range(max(counts.values())) for a in attr_names if d < counts[a]]
    for j in range(num_relations - n_attr):
        a, d = extra[j]
        text = f"same {a} as" if d == 0 else f"{a} is {d} step{'s' * (d > 1)} after that of"
        relations.append(_Relation(f"R{n_attr + j:02d}", text, a, d))

    # The folder left empty by the faults: an object that has no pictures anyway, else one
    # reserved object that keeps all its triples in train (so the splits never depend on
    # inject_faults and every dev/test head has pictures).
    imageless = [o for o in objects if num_images[o] == 0]
    with_images = [o for o in objects if num_images[o] > 0]
    if imageless:
        empty_folder, reserved = imageless[int(rng.integers(len(imageless)))], None
    else:
        empty_folder = reserved = with_images[int(rng.integers(len(with_images)))]
    eligible = [o for o in with_images if o != reserved]
    if not eligible:
        log.warning("no object has pictures: dev/test triples cannot be inferred at all")
        eligible = [o for o in objects if o != reserved]

    held_out: dict[int, tuple[str, str]] = {}
    for i, o in enumerate(rng.permutation(eligible)):
        held_out[int(o)] = (used[(i // 2) % n_attr], "test" if i % 2 == 0 else "dev")
    # Every value entity must appear in train: give back a held-out triple where needed.
    for j, a in enumerate(used):
        for v in range(counts[a]):
            holders = [o for o in objects if object_attrs[o - n_values, j] == v]
            if all(held_out.get(o, ("",))[0] == a for o in holders):
                del held_out[holders[0]]

    triples: dict[str, list[tuple[str, str, str]]] = {"train": [], "dev": [], "test": []}
    for o in objects:
        for j, a in enumerate(used):
            value = value_index[(a, int(object_attrs[o - n_values, j]))]
            held = held_out.get(o)
            split = held[1] if held and held[0] == a else "train"
            triples[split].append((ids[o], relations[j].rid, ids[value]))
    for rel in relations[n_attr:]:
        j = attr_names.index(rel.attribute)
        assert rel.offset is not None
        members = [o for o in objects if held_out.get(o, ("",))[0] != rel.attribute]
        by_value: dict[int, list[int]] = {}
        for o in members:
            by_value.setdefault(int(object_attrs[o - n_values, j]), []).append(o)
        for o in members:
            want = (int(object_attrs[o - n_values, j]) + rel.offset) % counts[rel.attribute]
            candidates = [t for t in by_value.get(want, []) if t != o]
            if not candidates:
                continue
            k = min(TAILS_PER_HEAD, len(candidates))
            for t in rng.choice(candidates, k, replace=False):
                triples["train"].append((ids[o], rel.rid, ids[int(t)]))
    for split, rows in triples.items():
        triples[split] = [rows[i] for i in rng.permutation(len(rows))]

    return _Plan(
        ids=ids,
        names=names,
        attr_counts=counts,
        used=used,
        value_of=value_of,
        value_index=value_index,
        object_attrs=object_attrs,
        num_images=num_images,
        jpeg=jpeg,
        relations=relations,
        held_out=held_out,
        empty_folder=empty_folder,
        triples=triples,
    )


def _write_text_files(out: Path, plan: _Plan) -> None:
    order = sorted(range(len(plan.ids)), key=lambda i: plan.ids[i])
    (out / "entity2text.txt").write_text(
        "".join(f"{plan.ids[i]}\t{plan.names[i]}\n" for i in order), encoding="utf-8"
    )
    relation_lines = "".join(f"{r.rid}\t{r.text}\n" for r in plan.relations)
    (out / "relation2text.txt").write_text(relation_lines, encoding="utf-8")
    for split, name in SPLIT_FILES.items():
        lines = "".join(f"{h}\t{r}\t{t}\n" for h, r, t in plan.triples[split])
        (out / name).write_text(lines, encoding="utf-8")


def _truth(plan: _Plan, images: dict[int, list[str]]) -> dict[str, Any]:
    entities: dict[str, Any] = {}
    for e, eid in enumerate(plan.ids):
        if e < plan.num_values:
            a, v = plan.value_of[e]
            row: dict[str, Any] = {"kind": "value", "attribute": a, "value": ATTRIBUTES[a][v]}
        else:
            held = plan.held_out.get(e)
            row = {
                "kind": "object",
                "attributes": {a: ATTRIBUTES[a][v] for a, v in plan.attrs_of(e).items()},
                "held_out": {"attribute": held[0], "split": held[1]} if held else None,
            }
        row["name"] = plan.names[e]
        row["images"] = images[e]
        entities[eid] = row
    return {
        "attributes": {a: list(ATTRIBUTES[a][: plan.attr_counts[a]]) for a in ATTRIBUTES},
        "relations": {
            r.rid: {
                "text": r.text,
                "attribute": r.attribute,
                "kind": "attribute" if r.offset is None else "object",
                "offset": r.offset,
            }
            for r in plan.relations
        },
        "entities": entities,
    }

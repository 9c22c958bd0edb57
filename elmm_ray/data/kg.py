"""Knowledge-graph loading: MKGformer, OpenKE and MyGO/NativE layouts into one
:class:`KnowledgeGraph`.

Entities and relations become dense integer ids; triples are ``(n, 3)`` int64 arrays of
``(head, relation, tail)`` per split. Queries use *query relations* ``qrel`` in
``[0, 2R)``: ``qrel < R`` asks ``(h, r, ?)`` (tail prediction); ``qrel >= R`` asks
``(t, r^-1, ?)`` (head prediction with relation ``qrel - R``). :class:`FilterIndex`
maps ``(entity, qrel)`` to every known answer, vectorised for batched ranking.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from elmm_ray.data.kg_io import (
    DatasetError,
    LoadReport,
    clip,
    read_lines,
    read_text_table,
    readable_name,
)
from elmm_ray.data.kg_mygo import MYGO_FILES, load_mygo

__all__ = ["DatasetError", "FilterIndex", "KnowledgeGraph", "LoadReport", "detect_format",
           "load_kg", "readable_name"]

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
MKGFORMER_FILES = {"train": "train.tsv", "valid": "dev.tsv", "test": "test.tsv"}
OPENKE_FILES = {"train": "train2id.txt", "valid": "valid2id.txt", "test": "test2id.txt"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
RELATION_CATEGORIES = ("1-1", "1-N", "N-1", "N-N")


class FilterIndex:
    """All known answers of each ``(entity, qrel)`` query, stored CSR-style.

    ``answers_of(e, q)`` gives a sorted array of answer ids; ``mask_pairs`` turns a batch of
    queries into (row, column) index pairs for masking a score matrix in one step.
    """

    def __init__(self, triples: np.ndarray, num_relations: int) -> None:
        self.num_relations = num_relations
        heads, rels, tails = triples[:, 0], triples[:, 1], triples[:, 2]
        # Tail queries (h, r) -> t and head queries (t, r + R) -> h, in one table.
        query_entity = np.concatenate([heads, tails])
        query_rel = np.concatenate([rels, rels + num_relations])
        answers = np.concatenate([tails, heads])
        keys = query_entity.astype(np.int64) * (2 * num_relations) + query_rel
        order = np.lexsort((answers, keys))
        keys, answers = keys[order], answers[order]
        # Drop duplicate (key, answer) pairs (a triple present in two splits).
        if len(keys):
            keep = np.ones(len(keys), dtype=bool)
            keep[1:] = (keys[1:] != keys[:-1]) | (answers[1:] != answers[:-1])
            keys, answers = keys[keep], answers[keep]
        self.keys, starts = np.unique(keys, return_index=True)
        self.offsets = np.append(starts, len(keys)).astype(np.int64)
        self.answers = answers.astype(np.int64)

    def _key(self, entities: np.ndarray, qrels: np.ndarray) -> np.ndarray:
        return np.asarray(entities, dtype=np.int64) * (2 * self.num_relations) + np.asarray(
            qrels, dtype=np.int64
        )

    def _slots(self, entities: np.ndarray, qrels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Start and end offsets into ``answers`` per query (empty when unknown)."""
        key = self._key(entities, qrels)
        pos = np.searchsorted(self.keys, key)
        pos_clipped = np.minimum(pos, max(len(self.keys) - 1, 0))
        found = (pos < len(self.keys)) & (self.keys[pos_clipped] == key) if len(self.keys) else (
            np.zeros(len(key), dtype=bool)
        )
        start = np.where(found, self.offsets[pos_clipped], 0)
        end = np.where(found, self.offsets[pos_clipped + 1] if len(self.keys) else 0, 0)
        return start, end

    def answers_of(self, entity: int, qrel: int) -> np.ndarray:
        start, end = self._slots(np.array([entity]), np.array([qrel]))
        return self.answers[start[0] : end[0]]

    def mask_pairs(self, entities: np.ndarray, qrels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, answer) pairs of every known answer of each query in the batch."""
        start, end = self._slots(entities, qrels)
        counts = end - start
        rows = np.repeat(np.arange(len(start)), counts)
        if rows.size == 0:
            return rows.astype(np.int64), rows.astype(np.int64)
        base = np.repeat(start - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        cols = self.answers[base + np.arange(rows.size)]
        return rows.astype(np.int64), cols

    def num_answers(self, entities: np.ndarray, qrels: np.ndarray) -> np.ndarray:
        start, end = self._slots(entities, qrels)
        return end - start


@dataclass
class KnowledgeGraph:
    """A multimodal KG: vocabularies, texts, triples per split, per-entity image files."""

    name: str
    entities: list[str]
    relations: list[str]
    entity_names: list[str]
    entity_descriptions: list[str]
    relation_texts: list[str]
    triples: dict[str, np.ndarray]
    entity_images: list[list[str]]
    has_text: np.ndarray
    image_root: str = ""
    report: LoadReport = field(default_factory=LoadReport)

    @property
    def num_entities(self) -> int:
        return len(self.entities)

    @property
    def num_relations(self) -> int:
        return len(self.relations)

    @cached_property
    def entity_index(self) -> dict[str, int]:
        return {e: i for i, e in enumerate(self.entities)}

    @cached_property
    def relation_index(self) -> dict[str, int]:
        return {r: i for i, r in enumerate(self.relations)}

    def entity_text(self, idx: int) -> str:
        """Name and description, as put in a prompt."""
        name, desc = self.entity_names[idx], self.entity_descriptions[idx]
        return f"{name}, {desc}" if desc and desc != name else name

    def filter_index(self, splits: Sequence[str] = SPLITS) -> FilterIndex:
        """Known answers across ``splits`` (default all: the filtered-ranking setting)."""
        key = tuple(splits)
        cache = self.__dict__.setdefault("_filter_cache", {})
        if key not in cache:
            unknown = [s for s in splits if s not in self.triples]
            if unknown:
                raise KeyError(f"unknown split(s) {unknown}; known: {list(self.triples)}")
            stacked = np.concatenate([self.triples[s] for s in splits]) if splits else (
                np.zeros((0, 3), dtype=np.int64)
            )
            cache[key] = FilterIndex(stacked, self.num_relations)
        return cache[key]

    def queries(self, split: str, both_directions: bool = True) -> np.ndarray:
        """``(n, 3)`` array of ``(entity, qrel, answer)``: tail queries, then head queries."""
        t = self.triples[split]
        tail = np.stack([t[:, 0], t[:, 1], t[:, 2]], axis=1)
        if not both_directions:
            return tail
        head = np.stack([t[:, 2], t[:, 1] + self.num_relations, t[:, 0]], axis=1)
        return np.concatenate([tail, head]).astype(np.int64)

    @cached_property
    def relation_categories(self) -> list[str]:
        """1-1, 1-N, N-1 or N-N per relation (Bordes et al.: mean tails per head and heads
        per tail over all triples, threshold 1.5)."""
        allt = np.concatenate([self.triples[s] for s in SPLITS if s in self.triples])
        cats = []
        for r in range(self.num_relations):
            sub = allt[allt[:, 1] == r]
            if len(sub) == 0:
                cats.append("1-1")
                continue
            pairs = np.unique(sub, axis=0)
            tails_per_head = len(pairs) / len(np.unique(pairs[:, 0]))
            heads_per_tail = len(pairs) / len(np.unique(pairs[:, 2]))
            many_t, many_h = tails_per_head >= 1.5, heads_per_tail >= 1.5
            cats.append({(False, False): "1-1", (False, True): "N-1",
                         (True, False): "1-N", (True, True): "N-N"}[(many_t, many_h)])
        return cats

    def stats(self) -> dict:
        """Counts that ``elmm-ray stats`` prints."""
        n_images = [len(x) for x in self.entity_images]
        return {
            "name": self.name,
            "entities": self.num_entities,
            "relations": self.num_relations,
            "triples": {s: int(len(t)) for s, t in self.triples.items()},
            "images_found": int(sum(n_images)),
            "entities_with_images": int(sum(1 for n in n_images if n)),
            "entities_without_images": int(sum(1 for n in n_images if not n)),
            "entities_without_text": int((~self.has_text).sum()),
            "relation_categories": {c: self.relation_categories.count(c)
                                    for c in RELATION_CATEGORIES},
            "duplicate_triples": dict(self.report.duplicate_triples),
            "unseen_in_train": dict(self.report.unseen),
            "warnings": len(self.report.warnings),
        }


# ---------------------------------------------------------------------------- parsing


def _read_mkgformer_triples(path: Path) -> list[tuple[str, str, str]]:
    rows = []
    for lineno, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        parts = line.rstrip("\r").split("\t")
        if len(parts) != 3 or not all(p.strip() for p in parts):
            raise DatasetError(
                f"{path}:{lineno}: expected 'head<TAB>relation<TAB>tail', got {clip(line, 120)}"
            )
        rows.append((parts[0].strip(), parts[1].strip(), parts[2].strip()))
    return rows


def _read_openke_vocab(path: Path) -> list[str]:
    """``count`` line then ``name<TAB or SPACE>id``; returns names indexed by id."""
    lines = [ln for ln in read_lines(path)]
    if not lines:
        raise DatasetError(f"{path}:1: empty file (expected a count line)")
    try:
        count = int(lines[0].strip())
    except ValueError as err:
        raise DatasetError(f"{path}:1: expected the entry count, got {clip(lines[0])}") from err
    names: dict[int, str] = {}
    for lineno, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        name, _, idx = line.rstrip().rpartition("\t") if "\t" in line else line.rstrip().rpartition(
            " "
        )
        try:
            i = int(idx)
        except ValueError as err:
            raise DatasetError(f"{path}:{lineno}: expected 'name id', got {clip(line)}"
                               ) from err
        if i in names:
            raise DatasetError(f"{path}:{lineno}: id {i} appears twice")
        names[i] = name.strip()
    if len(names) != count:
        raise DatasetError(f"{path}:1: the count line says {count} entries but {len(names)} "
                           "follow; correct the count")
    if sorted(names) != list(range(count)):
        missing = min(set(range(count)) - set(names))
        raise DatasetError(f"{path}:1: ids are not exactly 0..{count - 1} (id {missing} is "
                           "missing)")
    return [names[i] for i in range(count)]


def _read_openke_triples(path: Path, n_ent: int, n_rel: int) -> np.ndarray:
    lines = read_lines(path)
    if not lines:
        raise DatasetError(f"{path}:1: empty file (expected a count line)")
    try:
        count = int(lines[0].strip())
    except ValueError as err:
        raise DatasetError(f"{path}:1: expected the triple count, got {clip(lines[0])}") from err
    rows = []
    for lineno, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3:
            raise DatasetError(f"{path}:{lineno}: expected 'head tail relation', got {clip(line)}")
        try:
            h, t, r = (int(p) for p in parts)
        except ValueError as err:
            raise DatasetError(f"{path}:{lineno}: non-integer id in {clip(line)}") from err
        if not (0 <= h < n_ent and 0 <= t < n_ent):
            raise DatasetError(
                f"{path}:{lineno}: entity id out of range 0..{n_ent - 1}: {clip(line)}")
        if not 0 <= r < n_rel:
            raise DatasetError(
                f"{path}:{lineno}: relation id out of range 0..{n_rel - 1}: {clip(line)}"
            )
        rows.append((h, r, t))
    if len(rows) != count:
        raise DatasetError(f"{path}:1: the count line says {count} triples but {len(rows)} "
                           "follow; correct the count")
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


# ---------------------------------------------------------------------------- images


def image_folder_name(entity: str) -> str:
    """MKGformer's folder convention: ``/m/0abc`` -> ``m.0abc``; WordNet synset offset
    ``02174461`` -> ``n02174461``; anything else keeps its name (URIs: last path part)."""
    if entity.startswith("/"):
        return entity.lstrip("/").replace("/", ".")
    if re.fullmatch(r"\d{8}", entity):
        return f"n{entity}"
    if entity.startswith(("<http", "http")):
        return readable_name(entity).replace(" ", "_")
    return entity


def list_entity_images(image_root: Path, entities: Iterable[str]) -> list[list[str]]:
    """Sorted image files of each entity's folder (missing folder = no images)."""
    out = []
    root_ok = image_root.is_dir()
    for e in entities:
        folder = image_root / image_folder_name(e)
        if not root_ok or not folder.is_dir():
            out.append([])
            continue
        files = sorted(
            str(p) for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        out.append(files)
    return out


# ---------------------------------------------------------------------------- loaders


# What auto-detection looks for, in order: the first layout whose file exists wins.
LAYOUTS = {
    "mkgformer": ("train.tsv", "entity2text.txt, train.tsv, dev.tsv, test.tsv"),
    "openke": ("train2id.txt", "entity2id.txt, relation2id.txt, train2id.txt, valid2id.txt, "
                               "test2id.txt"),
    "mygo": (MYGO_FILES["train"], "entities.txt, relations.txt, train.txt, valid.txt, test.txt"),
}


def detect_format(path: Path) -> str:
    """The layout of a dataset folder: ``mkgformer``, ``openke`` or ``mygo`` (see LAYOUTS)."""
    for fmt, (marker, _) in LAYOUTS.items():
        if (path / marker).is_file():
            return fmt
    needs = "; ".join(f"{fmt}: {files}" for fmt, (_, files) in LAYOUTS.items())
    raise DatasetError(
        f"{path}: cannot tell the dataset format: no layout's triple file is there. "
        f"Each layout needs: {needs}. Point dataset.path at the folder holding them "
        "(or set dataset.format)"
    )


def _count_duplicates(split: str, arr: np.ndarray, report: LoadReport) -> None:
    """Duplicate rows are kept (benchmarks count each row as a query) but reported."""
    if len(arr) == 0:
        return
    dup = len(arr) - len(np.unique(arr, axis=0))
    if dup:
        report.duplicate_triples[split] = int(dup)
        report.warn(f"{split}: {dup} duplicate triple row(s) (kept as given)")


def _count_unseen(parts: dict, report: LoadReport) -> None:
    """Entities and relations of valid/test triples that no training triple holds: kept
    (they are queries and answers like any other) but counted and reported."""
    train = parts["triples"]["train"]
    other = np.concatenate([parts["triples"][s] for s in SPLITS[1:]])
    for kind, seen, used, names in (
            ("entities", train[:, [0, 2]], other[:, [0, 2]], parts["entities"]),
            ("relations", train[:, 1], other[:, 1], parts["relations"])):
        unseen = np.setdiff1d(np.unique(used), np.unique(seen))
        if len(unseen):
            report.unseen[kind] = int(len(unseen))
            examples = ", ".join(clip(names[i], 40) for i in unseen[:3])
            report.warn(f"{len(unseen)} {kind} appear only in valid/test, never in train "
                        f"(unseen in training: {examples}{', ...' if len(unseen) > 3 else ''})")


def _count_gaps(parts: dict, report: LoadReport) -> None:
    """Empty splits, entities without text, and entities / relations in no triple: loaded
    as they are, reported with their counts."""
    for split, arr in parts["triples"].items():
        if not len(arr):
            report.warn(f"{split}: no triples")
    without_text = int((~parts["has_text"]).sum())
    if without_text:
        report.warn(f"{without_text} of {len(parts['has_text'])} entities without text (a "
                    "readable form of their name is used)")
    used = np.concatenate(list(parts["triples"].values()))
    for kind, n, columns in (("entities", len(parts["entities"]), [0, 2]),
                             ("relations", len(parts["relations"]), [1])):
        isolated = n - len(np.unique(used[:, columns]))
        if isolated:
            report.warn(f"{isolated} {kind} appear in no triple of any split")


def _load_mkgformer(path: Path, report: LoadReport, use_long_text: bool) -> dict:
    raw = {s: _read_mkgformer_triples(path / f) for s, f in MKGFORMER_FILES.items()}
    ent_text = read_text_table(path / "entity2text.txt", report)
    long_path = path / "entity2textlong.txt"
    long_text = read_text_table(long_path, report) if use_long_text and long_path.is_file() else {}
    rel_path = path / "relation2text.txt"
    rel_text = read_text_table(rel_path, report) if rel_path.is_file() else {}
    if not rel_path.is_file():
        report.warn(f"{rel_path} missing; relation ids are used as their text")

    in_triples: dict[str, None] = {}
    rels_seen: dict[str, None] = {}
    for s in SPLITS:
        for h, r, t in raw[s]:
            in_triples.setdefault(h)
            in_triples.setdefault(t)
            rels_seen.setdefault(r)
    # Entity order: entity2text order, restricted to entities in triples; then the rest.
    entities = [e for e in ent_text if e in in_triples]
    listed = set(entities)
    entities += [e for e in in_triples if e not in listed]
    report.text_rows_unused = len(ent_text) - len(listed)
    if report.text_rows_unused:
        report.warn(f"{path / 'entity2text.txt'}: {report.text_rows_unused} row(s) name no "
                    "entity of the triples; left out")
    relations = [r for r in rel_text if r in rels_seen]
    rel_listed = set(relations)
    relations += [r for r in rels_seen if r not in rel_listed]

    e_idx = {e: i for i, e in enumerate(entities)}
    r_idx = {r: i for i, r in enumerate(relations)}
    triples = {
        s: np.asarray([(e_idx[h], r_idx[r], e_idx[t]) for h, r, t in raw[s]], dtype=np.int64)
        .reshape(-1, 3)
        for s in SPLITS
    }
    names, descs, has_text = [], [], []
    for e in entities:
        text = ent_text.get(e)
        has_text.append(text is not None)
        if text is None:
            names.append(readable_name(e))
            descs.append("")
            continue
        # WN18's entity2text holds "lemma, gloss"; FB15k-237's holds just the name.
        name, _, desc = text.partition(", ") if not e.startswith("/") else (text, "", "")
        names.append(name or readable_name(e))
        descs.append(long_text.get(e, desc))
    missing_rel_text = [r for r in relations if r not in rel_text]
    if rel_path.is_file() and missing_rel_text:
        report.warn(f"{len(missing_rel_text)} relation(s) without text in relation2text.txt")
    rel_texts = [rel_text.get(r, readable_name(r).replace(".", " ")) for r in relations]
    return dict(entities=entities, relations=relations, entity_names=names,
                entity_descriptions=descs, relation_texts=rel_texts, triples=triples,
                has_text=np.asarray(has_text, dtype=bool))


def _load_openke(path: Path, report: LoadReport) -> dict:
    entities = _read_openke_vocab(path / "entity2id.txt")
    relations = _read_openke_vocab(path / "relation2id.txt")
    triples = {
        s: _read_openke_triples(path / f, len(entities), len(relations))
        for s, f in OPENKE_FILES.items()
    }
    ent_text_path = path / "entity2text.txt"
    ent_text = read_text_table(ent_text_path, report) if ent_text_path.is_file() else {}
    unused = len(set(ent_text) - set(entities))
    if unused:
        report.warn(f"{ent_text_path}: {unused} row(s) name no entity of entity2id.txt; "
                    "left out")
    names, descs, has_text = [], [], []
    for e in entities:
        text = ent_text.get(e)
        has_text.append(text is not None)
        names.append(text if text else readable_name(e))
        descs.append("")
    return dict(entities=entities, relations=relations, entity_names=names,
                entity_descriptions=descs,
                relation_texts=[readable_name(r).replace("_", " ") for r in relations],
                triples=triples, has_text=np.asarray(has_text, dtype=bool))


def load_kg(
    path: str | Path,
    *,
    format: str = "auto",
    image_root: str | Path | None = None,
    use_long_text: bool = False,
    name: str | None = None,
) -> KnowledgeGraph:
    """Load a dataset folder (MKGformer, OpenKE or MyGO/NativE layout) into a
    :class:`KnowledgeGraph`.

    Raises :class:`DatasetError` naming the file and line of any malformed input.
    Duplicate triple rows are kept as given and counted in ``report``.
    """
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"dataset folder {path} does not exist")
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in LAYOUTS:
        raise DatasetError(f"unknown dataset format {format!r}; use auto, "
                           + ", ".join(LAYOUTS))
    report = LoadReport()
    if fmt == "mkgformer":
        parts = _load_mkgformer(path, report, use_long_text)
    elif fmt == "openke":
        parts = _load_openke(path, report)
    else:
        parts = load_mygo(path, report)
    for split, arr in parts["triples"].items():
        _count_duplicates(split, arr, report)
    _count_unseen(parts, report)
    _count_gaps(parts, report)
    root = Path(image_root) if image_root else path / "images"
    images = list_entity_images(root, parts["entities"])
    return KnowledgeGraph(name=name or path.name, entity_images=images, image_root=str(root),
                          report=report, **parts)

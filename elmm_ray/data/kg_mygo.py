"""The MyGO / NativE release layout of DB15K, MKG-W and MKG-Y.

::

    entities.txt     one entity name per line; the line order is the entity id
    relations.txt    one relation name per line, likewise
    train.txt        head<TAB>relation<TAB>tail, by name (also valid.txt, test.txt)
    entity2id.txt    optional: ``URI<SPACE or TAB>name`` (a count line first or not): the
                     URI behind each name, made readable as the entity's text
    relation2id.txt  optional, the same for relations
    entity2text.txt  optional: ``name<TAB>text``; wins over entity2id.txt

In the DB15K release the names are the OpenKE ids (``"0"`` .. ``"12841"``), so entity ids
here equal the OpenKE ids of the same benchmark. Per-entity visual embeddings of these
releases (e.g. NativE's ``DB15K-visual.pth``, rows in entity-id order) are read by
:mod:`elmm_ray.data.embeddings`.
"""

from __future__ import annotations

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

SPLIT_FILES = {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"}
MYGO_FILES = {**SPLIT_FILES, "entities": "entities.txt", "relations": "relations.txt"}


def read_name_list(path: Path) -> list[str]:
    """One name per line, the line order being the id. Trailing blank lines are ignored; a
    blank line before the last name would shift every later id, so it is an error."""
    lines = [line.strip() for line in read_lines(path)]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise DatasetError(f"{path}: empty file (expected one name per line)")
    seen: dict[str, int] = {}
    for lineno, name in enumerate(lines, 1):
        if not name:
            raise DatasetError(f"{path}:{lineno}: blank line (the line order is the id, so a "
                               "blank line would shift every later id); remove it")
        if name in seen:
            raise DatasetError(f"{path}:{lineno}: {clip(name)} appears twice (first at line "
                               f"{seen[name]})")
        seen[name] = lineno
    return lines


def read_triples(path: Path, entities: dict[str, int], relations: dict[str, int]
                 ) -> np.ndarray:
    """``head<TAB>relation<TAB>tail`` lines into ``(n, 3)`` int64 ids."""
    rows = []
    for lineno, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.rstrip("\r").split("\t")]
        if len(parts) != 3 or not all(parts):
            raise DatasetError(
                f"{path}:{lineno}: expected 'head<TAB>relation<TAB>tail', got {clip(line, 120)}")
        h, r, t = parts
        for name, vocab, kind in ((h, entities, "entity"), (r, relations, "relation"),
                                  (t, entities, "entity")):
            if name not in vocab:
                listed = "entities.txt" if kind == "entity" else "relations.txt"
                raise DatasetError(f"{path}:{lineno}: unknown {kind} {clip(name)} (not in "
                                   f"{listed})")
        rows.append((entities[h], relations[r], entities[t]))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def read_uri_map(path: Path, names: set[str], report: LoadReport) -> dict[str, str]:
    """``URI<SPACE or TAB>name`` lines (an optional count line first) -> {name: URI}; rows
    whose name is not in ``names`` are counted and reported."""
    lines = read_lines(path)
    start = 1 if lines and lines[0].strip().isdigit() else 0
    out: dict[str, str] = {}
    unused = rows = 0
    for lineno, line in enumerate(lines[start:], start + 1):
        if not line.strip():
            continue
        rows += 1
        sep = "\t" if "\t" in line else " "
        uri, _, name = line.rstrip().rpartition(sep)
        if not uri.strip() or not name.strip():
            raise DatasetError(f"{path}:{lineno}: expected 'URI name', got {clip(line, 120)}")
        if name.strip() not in names:
            unused += 1
            continue
        out[name.strip()] = uri.strip()
    if unused:
        report.warn(f"{path}: {unused} row(s) name no listed entry; left out")
    if start and int(lines[0]) != rows:
        report.warn(f"{path}:1: the count line says {int(lines[0])} rows but {rows} follow "
                    "(the rows are used)")
    return out


def load_mygo(path: Path, report: LoadReport) -> dict:
    """The parts of a :class:`~elmm_ray.data.kg.KnowledgeGraph` from a MyGO/NativE folder."""
    entities = read_name_list(path / MYGO_FILES["entities"])
    relations = read_name_list(path / MYGO_FILES["relations"])
    e_idx = {e: i for i, e in enumerate(entities)}
    r_idx = {r: i for i, r in enumerate(relations)}
    triples = {s: read_triples(path / f, e_idx, r_idx) for s, f in SPLIT_FILES.items()}

    def optional(name: str, read):
        file = path / name
        return read(file) if file.is_file() else {}

    ent_text = optional("entity2text.txt", lambda f: read_text_table(f, report))
    ent_uri = optional("entity2id.txt", lambda f: read_uri_map(f, set(e_idx), report))
    rel_uri = optional("relation2id.txt", lambda f: read_uri_map(f, set(r_idx), report))
    names, has_text = [], []
    for e in entities:
        text = ent_text.get(e) or (readable_name(ent_uri[e]) if e in ent_uri else None)
        has_text.append(text is not None)
        names.append(text or readable_name(e))
    rel_texts = [readable_name(rel_uri.get(r, r)).replace("_", " ") for r in relations]
    return dict(entities=entities, relations=relations, entity_names=names,
                entity_descriptions=[""] * len(entities), relation_texts=rel_texts,
                triples=triples, has_text=np.asarray(has_text, dtype=bool))

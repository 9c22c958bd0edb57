"""Precomputed per-entity visual embeddings as a feature-store source.

MMKG releases often ship one vector (or a few) per entity instead of images, e.g. NativE's
``embeddings/DB15K-visual.pth``: a float tensor ``[num_entities, dim]`` whose rows follow
the entity ids. :func:`embeddings_to_store` reads such a file and writes the project's
feature store (:mod:`elmm_ray.data.feature_store`), so training and evaluation read it like
a store of vision-tower features. Shapes:

- ``[E, dim]``: one vector per entity (one image slot of one token);
- ``[E, n, dim]`` with ``axis="images"``: one vector per image (n slots of one token, the
  first ``max_images`` kept);
- ``[E, n, dim]`` with ``axis="tokens"``: n tokens of one entity (one slot of n tokens).

Rows follow the dataset's entity order unless an ids file names the entity of each row.
An entity without a vector (not in the ids file, or an all-zero row: releases fill missing
images with zeros) gets zeros and a cleared mask, as an entity without images does; the
counts are in the store's manifest. Files are read without pickle: ``.npy``/``.npz`` with
``allow_pickle=False``, ``.pt``/``.pth`` with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from elmm_ray.data.feature_store import (
    DEFAULT_PART_BYTES,
    FEATURE_DTYPE,
    INDEX,
    INDEX_SCHEMA,
    MANIFEST,
    METADATA,
    PARTS,
    STORE_VERSION,
    StoreLocation,
    embeddings_identity,
    image_keys,
    read_fragments,
    write_index,
    write_part,
)
from elmm_ray.data.kg_io import DatasetError
from elmm_ray.data.kg_mygo import read_name_list
from elmm_ray.integrity import sha256_file

log = logging.getLogger(__name__)

FP16_MAX = float(np.finfo(np.float16).max)


class EmbeddingsError(ValueError):
    """An embedding file that cannot be used: names the file and the problem."""


@dataclass
class EmbeddingTable:
    """Per-entity features ``(E, slots, tokens, width)`` fp16, mask ``(E, slots)`` and the
    counts of what was matched, dropped or missing."""

    features: np.ndarray
    mask: np.ndarray
    counts: dict


def _pick(arrays: dict, key: str | None, path: Path) -> object:
    if key is not None:
        if key not in arrays:
            raise EmbeddingsError(f"{path}: no array named {key!r}; it holds "
                                  f"{', '.join(sorted(arrays)[:10])}")
        return arrays[key]
    if len(arrays) != 1:
        raise EmbeddingsError(
            f"{path} holds {len(arrays)} arrays ({', '.join(sorted(arrays)[:10])}); name one "
            "with dataset.visual_embeddings.key")
    return next(iter(arrays.values()))


def read_embedding_file(path: str | Path, key: str | None = None) -> np.ndarray:
    """The array of an embedding file as float32 (see the module doc for the formats)."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingsError(f"embedding file {path} does not exist "
                              "(dataset.visual_embeddings.path)")
    suffix = path.suffix.lower()
    if suffix in (".pkl", ".pickle"):
        raise EmbeddingsError(f"{path}: pickle files are never loaded (they can run code); "
                              "convert it to .npy (numpy.save) where it was made")
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise EmbeddingsError(f"{path}: not a plain numeric .npy ({err})") from err
    elif suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                array = np.asarray(_pick({k: npz[k] for k in npz.files}, key, path))
        except ValueError as err:
            raise EmbeddingsError(f"{path}: not a plain numeric .npz ({err})") from err
    elif suffix in (".safetensors", ".pt", ".pth"):
        array = _read_torch_file(path, key, suffix)
    else:
        raise EmbeddingsError(f"{path}: unknown file type {suffix!r}; use .npy, .npz, "
                              ".safetensors, .pt or .pth")
    if array.dtype.kind != "f":
        raise EmbeddingsError(
            f"{path}: holds {array.dtype} values, not float vectors (discrete token ids, "
            "such as MyGO's tokenized features, are not embeddings)")
    return np.asarray(array, dtype=np.float32)


def _read_torch_file(path: Path, key: str | None, suffix: str) -> np.ndarray:
    import pickle

    import torch

    if suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: object = load_file(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise EmbeddingsError(
                f"{path}: torch.load(weights_only=True) refused it (it holds Python objects "
                "beyond tensors); convert it to .npy or .safetensors where it was made"
            ) from err
    if isinstance(obj, dict):
        obj = _pick(obj, key, path)
    if not isinstance(obj, torch.Tensor):
        raise EmbeddingsError(f"{path}: expected a tensor, found {type(obj).__name__}")
    if obj.is_floating_point():
        return obj.float().numpy()
    return obj.numpy()


def _check_finite(values: np.ndarray, path: Path, what: str) -> None:
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise EmbeddingsError(f"{path}: {len(rows)} row(s) hold NaN or inf{what} (first: row "
                              f"{int(rows[0])}); fix or drop them at the source")


def load_visual_embeddings(path: str | Path, entities: list[str], *, key: str | None = None,
                           ids: str | Path | None = None, axis: str = "images",
                           max_images: int = 10) -> EmbeddingTable:
    """Read ``path`` and lay it out per entity of ``entities`` (the dataset's order)."""
    path = Path(path)
    array = read_embedding_file(path, key)
    if array.ndim not in (2, 3) or array.shape[0] == 0 or array.shape[-1] == 0:
        raise EmbeddingsError(
            f"{path}: shape {list(array.shape)} is not [entities, dim], [entities, n_images, "
            "dim] or [entities, n_tokens, dim]")
    _check_finite(array, path, "")
    if array.ndim == 2:
        array = array[:, None, None, :]
    elif axis == "images":
        array = array[:, :, None, :]
    elif axis == "tokens":
        array = array[:, None, :, :]
    else:
        raise EmbeddingsError(f"unknown axis {axis!r}; use images or tokens")
    slots_in_file = array.shape[1]
    array = array[:, : max(max_images, 1)]
    rows = array.shape[0]
    num = len(entities)
    counts = {"rows": rows, "entities": num, "rows_unmatched": 0,
              "slots_beyond_max_images": int(rows * (slots_in_file - array.shape[1]))}
    if ids is None:
        if rows != num:
            raise EmbeddingsError(
                f"{path}: {rows} rows but the dataset has {num} entities; give the entity "
                "of each row with dataset.visual_embeddings.ids, or use the file made for "
                "this dataset")
        target = np.arange(rows)
    else:
        try:
            names = read_name_list(Path(ids))
        except DatasetError as err:
            raise EmbeddingsError(str(err)) from err
        if len(names) != rows:
            raise EmbeddingsError(f"{ids} names {len(names)} entities but {path} has {rows} "
                                  "rows; they must match line for row")
        index = {e: i for i, e in enumerate(entities)}
        target = np.asarray([index.get(n, -1) for n in names], dtype=np.int64)
        counts["rows_unmatched"] = int((target < 0).sum())
        if counts["rows_unmatched"] == rows:
            raise EmbeddingsError(f"none of the {rows} names in {ids} is an entity of the "
                                  f"dataset (first: {names[0]!r}); is it the right ids file?")
    values = np.abs(array).max(axis=3) > 0  # (rows, slots, tokens): a nonzero vector
    slot_mask = values.any(axis=2)
    counts["zero_rows"] = int((~slot_mask.any(axis=1))[target >= 0].sum())
    if np.abs(array).max(initial=0.0) > FP16_MAX:
        raise EmbeddingsError(f"{path}: values beyond the fp16 range (|x| > {FP16_MAX:.0f}) "
                              "cannot be stored; scale the embeddings first")
    _, slots, tokens, width = array.shape
    features = np.zeros((num, slots, tokens, width), dtype=FEATURE_DTYPE)
    mask = np.zeros((num, slots), dtype=bool)
    keep = target >= 0
    features[target[keep]] = array[keep].astype(FEATURE_DTYPE)
    mask[target[keep]] = slot_mask[keep]
    with_vectors = int(mask.any(axis=1).sum())
    counts.update(entities_with_embeddings=with_vectors,
                  entities_without_embeddings=num - with_vectors,
                  vectors_stored=int(mask.sum()))
    return EmbeddingTable(features, mask, counts)


def embeddings_to_store(path: str | Path, store_dir: str, entities: list[str], *,
                        key: str | None = None, ids: str | None = None, axis: str = "images",
                        max_images: int = 10, part_bytes: int = DEFAULT_PART_BYTES) -> dict:
    """Write the feature store ``store_dir`` from the embedding file ``path``; returns its
    manifest (counts of entities with and without a vector, rows unmatched, ...)."""
    start = time.perf_counter()
    table = load_visual_embeddings(path, entities, key=key, ids=ids, axis=axis,
                                   max_images=max_images)
    num, slots, tokens, width = table.features.shape
    metadata = {"version": STORE_VERSION,
                **embeddings_identity(str(path), key, ids, axis, max_images),
                "embeddings_sha256": sha256_file(path), "feature_dtype": "float16",
                "tokens": tokens, "width": width, "max_images_per_entity": slots,
                "num_entities": num, "layer": None, "pool": None, "weights_fingerprint": None}
    metadata["fingerprint"] = hashlib.sha256(
        repr(sorted(metadata.items())).encode()).hexdigest()[:20]
    loc = StoreLocation(store_dir)
    loc.mkdir()
    for rel in (MANIFEST, INDEX, METADATA):  # the manifest first: the store is incomplete
        loc.delete(rel)
    for name in loc.list(PARTS):
        loc.delete(posixpath.join(PARTS, name))
    loc.mkdir(PARTS)
    loc.write_json(METADATA, metadata)
    entity, slot = np.nonzero(table.mask)  # row-major: entity order, then slot
    rows_per_part = max(1, part_bytes // (tokens * width * np.dtype(FEATURE_DTYPE).itemsize))
    for begin in range(0, len(entity), rows_per_part):
        e, s = entity[begin: begin + rows_per_part], slot[begin: begin + rows_per_part]
        name = "part-" + hashlib.sha256(image_keys(e, s).tobytes()).hexdigest()[:16]
        part = table.features[e, s]
        fragment = pa.table({
            "entity": pa.array(e, pa.int32()),
            "entity_id": pa.array([entities[i] for i in e], pa.string()),
            "image_index": pa.array(s, pa.int16()),
            "row": pa.array(np.arange(len(e)), pa.int32()),
            "reason": pa.array([""] * len(e), pa.string()),
        }, schema=INDEX_SCHEMA)
        write_part(loc, name, part, fragment)
    part_checksums: dict = {}
    fragments, parts = read_fragments(loc, part_checksums)
    index = fragments.sort_by([("entity", "ascending"), ("image_index", "ascending")])
    index_record = write_index(loc, index)
    counts = table.counts
    if counts["entities_without_embeddings"]:
        log.warning("visual embeddings: %d of %d entities have none (zeros + mask)",
                    counts["entities_without_embeddings"], num)
    manifest = {"status": "complete", "fingerprint": metadata["fingerprint"],
                "store": loc.uri, "source": "embeddings", "embeddings_file": str(path),
                "tokens": tokens, "width": width, "slots": slots, "counts": counts,
                "parts": len(parts), "seconds": time.perf_counter() - start,
                "checksums": {"index": index_record, "parts": part_checksums}}
    loc.write_json(MANIFEST, manifest)  # last: its presence marks a complete store
    return manifest

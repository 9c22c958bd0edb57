"""The feature store: per-image visual features that the extract stage writes and that
training, evaluation and export read.

The store is a directory (local path or a ``pyarrow.fs`` URI)::

    metadata.json                 backbone, vision-weights fingerprint, layer, pool, shapes,
                                  the tower's preprocessing
    parts/part-<hash>.npy         fp16 (rows, tokens, width), memory-mappable
    parts/part-<hash>.index.parquet   (entity, entity_id, image_index, row, reason)
    index.parquet                 all fragments merged, written when the run completes
    manifest.json                 counts of every image (done / skipped / failed), last

A part is committed when its index fragment exists (both written to a temporary name and
renamed); the fragment records its ``.npy``'s size and sha256, the manifest collects them
and ``index.parquet``'s. Readers check each part on first use in a process (cloud: size;
then a node-local copy checked by sha256, :func:`elmm_ray.remote.cached_copy`); a corrupt
part leaves the committed set, so the next extract redoes its images. :class:`FeatureStore`
serves ``features_for(entity_ids)`` like ``FeatureBank``, its metadata checked against the
model. Its writer is the Ray Data pipeline of :mod:`elmm_ray.data.extraction`."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

if TYPE_CHECKING:  # torch is imported where it is used: the writer tasks do without it
    import torch

from elmm_ray.integrity import CORRUPT_SUFFIX, CorruptionError, HashingWriter, verified_sha256
from elmm_ray.layout import RunLayout
from elmm_ray.remote import cached_copy

log = logging.getLogger(__name__)

STORE_VERSION = 1
METADATA = "metadata.json"
MANIFEST = "manifest.json"
INDEX = "index.parquet"
PARTS = "parts"
FRAGMENT_SUFFIX = ".index.parquet"
FEATURE_DTYPE = np.float16
DEFAULT_PART_BYTES = 64 * 1024 * 1024
INDEX_SCHEMA = pa.schema([
    ("entity", pa.int32()),
    ("entity_id", pa.string()),
    ("image_index", pa.int16()),
    ("row", pa.int32()),  # -1: failed, nothing stored
    ("reason", pa.string()),  # "" when done
])
FINGERPRINT_FIELDS = (  # the fields of metadata.json that decide whether features are reused
    "version", "weights_fingerprint", "layer", "pool", "model_dtype", "tokens", "width",
    "image_size", "max_images_per_entity", "num_entities", "pack_fingerprint", "pixels")


def image_keys(entity: np.ndarray, image_index: np.ndarray) -> np.ndarray:
    """One int64 per (entity, image_index)."""
    return (np.asarray(entity, dtype=np.int64) << 16) | np.asarray(image_index, dtype=np.int64)


# ------------------------------------------------------------------------------ storage


class StoreLocation:
    """A directory on the local disk or behind a ``pyarrow.fs`` URI (``s3://``, ``gs://``,
    ``file://`` ...). Writes go through a temporary name and a rename."""

    def __init__(self, root: str | os.PathLike) -> None:
        root = str(root)
        self.is_local = "://" not in root
        if self.is_local:
            self.fs: pafs.FileSystem = pafs.LocalFileSystem()
            self.root = str(Path(root).expanduser().resolve())
        else:
            self.fs, self.root = pafs.FileSystem.from_uri(root)
            self.root = self.root.rstrip("/")
        self.uri = root if not self.is_local else self.root

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if not self.is_local else os.path.join(
            self.root, *parts)

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def mkdir(self, rel: str = "") -> None:
        self.fs.create_dir(self.path(rel) if rel else self.root, recursive=True)

    def list(self, rel: str) -> list[str]:
        """Base names of the files in ``rel`` (none when it does not exist)."""
        selector = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector)
                      if info.type == pafs.FileType.File)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_atomic(self, rel: str, write: Callable[[Any], None]) -> None:
        """Call ``write(stream)`` on a temporary file next to ``rel``, then rename it."""
        final = self.path(rel)
        head, name = os.path.split(rel)
        tmp = self.path(head, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
        with self.fs.open_output_stream(tmp) as f:
            write(f)
        self.fs.move(tmp, final)

    def write_json(self, rel: str, data: Any) -> None:
        text = (json.dumps(data, indent=2, default=str) + "\n").encode()
        self.write_atomic(rel, lambda f: f.write(text))

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.path(rel))
        except FileNotFoundError:
            pass


def write_part(loc: StoreLocation, name: str, features: np.ndarray, fragment: pa.Table) -> dict:
    """Commit one part: its ``.npy``, then its index fragment carrying the ``.npy``'s size and
    sha256 (the fragment's presence commits the part). Returns that record."""
    box: dict = {}

    def write(stream: Any) -> None:
        hashing = HashingWriter(stream)
        write_npy(hashing, features)
        box.update(hashing.record())

    loc.write_atomic(posixpath.join(PARTS, name + ".npy"), write)
    meta = {b"npy_bytes": str(box["bytes"]).encode(), b"npy_sha256": box["sha256"].encode()}
    fragment = fragment.replace_schema_metadata(meta)
    loc.write_atomic(posixpath.join(PARTS, name + FRAGMENT_SUFFIX),
                     lambda f: pq.write_table(fragment, f, write_page_checksum=True))
    return dict(box)


def write_index(loc: StoreLocation, table: pa.Table) -> dict:
    """Write ``index.parquet`` atomically; returns its size and sha256 (for the manifest)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, write_page_checksum=True)
    data = buf.getvalue()
    loc.write_atomic(INDEX, lambda f: f.write(data))
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_json_or_none(loc: StoreLocation, rel: str) -> Any:
    """JSON of ``rel``; ``None`` when absent or not valid JSON (a warning; extract rebuilds)."""
    if not loc.exists(rel):
        return None
    try:
        return loc.read_json(rel)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        log.warning("feature store: %s is unreadable (%s); treating it as absent",
                    loc.path(rel), err)
        return None


def uncommit_part(loc: StoreLocation, part: str) -> None:
    """Take a bad part out of the committed set: its ``.npy`` and fragment are moved aside
    to ``*.corrupt`` and the manifest and index removed, so the store is incomplete and the
    next extract re-extracts exactly that part's images."""
    loc.delete(MANIFEST)
    loc.delete(INDEX)
    for name in (part + FRAGMENT_SUFFIX, part + ".npy"):
        if loc.exists(rel := posixpath.join(PARTS, name)):
            loc.fs.move(loc.path(rel), loc.path(rel + CORRUPT_SUFFIX))


REEXTRACT_HINT = "rerun `elmm-ray extract`: it re-extracts only the images of the bad part"


def write_npy(stream: Any, array: np.ndarray) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False,
              "shape": tuple(array.shape)}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    stream.write(buf.getvalue())
    stream.write(np.ascontiguousarray(array).tobytes())


class _RemoteRows:
    """Row access to an ``.npy`` part through ``read_at`` (``ELMM_PART_CACHE=off``)."""

    def __init__(self, fs: pafs.FileSystem, path: str) -> None:
        self.file = fs.open_input_file(path)
        header = io.BytesIO(self.file.read_at(1024, 0))
        version = np.lib.format.read_magic(header)
        reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
        self.shape, _, self.dtype = reader(header)
        self.offset = header.tell()
        self.row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        for i, row in enumerate(np.asarray(rows)):
            data = self.file.read_at(self.row_bytes, self.offset + int(row) * self.row_bytes)
            out[i] = np.frombuffer(data, dtype=self.dtype).reshape(self.shape[1:])
        return out


def read_fragments(loc: StoreLocation, checksums: dict | None = None
                   ) -> tuple[pa.Table, list[str]]:
    """The committed index fragments (with a ``part`` column) and their part names;
    ``checksums`` (a dict) receives each part's recorded ``.npy`` size and sha256."""
    names = [n for n in loc.list(PARTS) if n.endswith(FRAGMENT_SUFFIX) and not n.startswith(".")]
    tables, parts = [], []
    for name in names:
        part = name[: -len(FRAGMENT_SUFFIX)]
        rel = posixpath.join(PARTS, name)
        try:
            table = pq.read_table(pa.BufferReader(loc.read_bytes(rel)),
                                  page_checksum_verification=True)
        except (pa.ArrowInvalid, OSError) as err:
            uncommit_part(loc, part)
            raise CorruptionError(f"corrupt index fragment {loc.path(rel)} ({err}); it was "
                                  f"moved aside: {REEXTRACT_HINT}") from None
        meta = table.schema.metadata or {}
        if checksums is not None and b"npy_sha256" in meta:
            checksums[part] = {"bytes": int(meta[b"npy_bytes"]),
                               "sha256": meta[b"npy_sha256"].decode()}
        table = table.cast(INDEX_SCHEMA)
        tables.append(table.append_column("part", pa.array([part] * table.num_rows, pa.string())))
        parts.append(part)
    if not tables:
        empty = INDEX_SCHEMA.append(pa.field("part", pa.string())).empty_table()
        return empty, []
    return pa.concat_tables(tables), parts


# ------------------------------------------------------------------------------ metadata


def vision_weights_fingerprint(source: str, dtype: str = "float32") -> str:
    """sha256 over the vision tower's tensors (names, dtypes, shapes, bytes): read straight
    from the checkpoint's safetensors files when there are any (no model is built), else
    from the loaded backbone's vision tower."""
    files = vision_safetensors_files(source)
    if files:
        from safetensors import safe_open

        digests = []
        for file in files:
            with safe_open(file, framework="pt") as st:
                for key in st.keys():
                    if "vision_tower." in key:
                        name = key.split("vision_tower.", 1)[1]
                        digests.append(_tensor_digest(name, st.get_tensor(key)))
        if digests:
            return "st-" + _combine(digests)
    from elmm_ray.models.backbone import load_backbone, vision_tower_of

    tower = vision_tower_of(load_backbone(source, dtype))
    return "sd-" + _combine([_tensor_digest(k, v) for k, v in tower.state_dict().items()])


def _tensor_digest(name: str, tensor: torch.Tensor) -> str:
    import torch

    flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    digest = hashlib.sha256(memoryview(flat)).hexdigest()
    return f"{name}|{str(tensor.dtype)}|{tuple(tensor.shape)}|{digest}"


def _combine(digests: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()[:32]


def vision_safetensors_files(source: str) -> list[str]:
    """The safetensors files of ``source`` holding its vision tower (none: not safetensors)."""
    path = Path(source).expanduser()
    if not path.is_dir():
        try:  # a hub id: its snapshot in this node's cache, fetched once a node (models.hub)
            from elmm_ray.models.hub import local_dir

            path = Path(local_dir(source))
        except Exception as err:  # noqa: BLE001 - fall back to loading the model
            log.info("no snapshot of %s (%s); loading the whole model", source, err)
            return []
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({str(path / f) for k, f in weight_map.items() if "vision_tower." in k})
    return sorted(str(p) for p in path.glob("*.safetensors"))


def vision_geometry(source: str, pool: int, layer: int, trust_remote_code: bool = False
                    ) -> dict:
    """``image_size``, ``tokens``, ``width`` and ``pixels`` (its preprocessing, a dict) of
    the features of backbone ``source``."""
    from transformers import AutoConfig

    from elmm_ray.models.backbone import num_image_tokens
    from elmm_ray.models.hub import local_first
    from elmm_ray.models.towers import pixel_spec

    vision = local_first(AutoConfig.from_pretrained, source,
                         trust_remote_code=trust_remote_code).vision_config
    layers = vision.num_hidden_layers
    if not -(layers + 1) <= layer <= layers:
        raise ValueError(f"vision_feature_layer {layer} is outside the {layers}-layer tower "
                         f"(hidden states -{layers + 1}..{layers})")
    return {"image_size": int(vision.image_size), "width": int(vision.hidden_size),
            "tokens": num_image_tokens(vision.image_size, vision.patch_size, pool),
            "pixels": pixel_spec(source, vision).to_dict()}


def store_fingerprint(metadata: dict) -> str:
    payload = json.dumps({k: metadata.get(k) for k in FINGERPRINT_FIELDS}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def embeddings_identity(path: str, key: str | None, ids: str | None, axis: str,
                        max_images: int) -> dict:
    """The metadata fields that tie a store written from precomputed embeddings
    (:mod:`elmm_ray.data.embeddings`) to the config that asked for it."""
    return {"source": "embeddings", "embeddings_file": str(path), "embeddings_key": key,
            "embeddings_ids": ids, "embeddings_axis": axis,
            "embeddings_max_images": int(max_images)}


def expected_metadata(cfg: Any, source: str, *, check_weights: bool = True) -> dict:
    """What a model of ``cfg`` over backbone ``source`` needs from a feature store (for
    precomputed embeddings: that the store was written from the configured file)."""
    emb = cfg.dataset.visual_embeddings
    if emb.path:
        return embeddings_identity(emb.path, emb.key, emb.ids, emb.axis,
                                   cfg.images.max_images_per_entity)
    expect = {"layer": cfg.model.vision_feature_layer, "pool": cfg.model.feature_pool,
              "max_images_per_entity": cfg.images.max_images_per_entity}
    geometry = vision_geometry(source, cfg.model.feature_pool, cfg.model.vision_feature_layer,
                               cfg.model.trust_remote_code)
    expect.update(tokens=geometry["tokens"], width=geometry["width"])
    if check_weights:
        expect["weights_fingerprint"] = vision_weights_fingerprint(source, cfg.model.dtype)
    return expect


def open_feature_store(cfg: Any, source: str, path: str | None = None) -> FeatureStore:
    """The complete feature store of ``cfg`` (default: the run layout's location), checked
    against the model of ``cfg`` over backbone ``source`` (see
    :func:`elmm_ray.train.context.backbone_source`)."""
    location = path or RunLayout.of(cfg).feature_store
    return FeatureStore.open(location, expect=expected_metadata(cfg, source))


# ------------------------------------------------------------------------------ the store


class FeatureStore:
    """Random access to the stored features by entity id.

    ``features_for`` returns what :meth:`FeatureBank.features_for` returns: float32
    ``(B, max_images, tokens, width)`` and a bool mask ``(B, max_images)``. Local parts are
    memory-mapped; a pickled store carries only its path and reopens on first use.
    """

    def __init__(self, path: str | os.PathLike, metadata: dict, *,
                 allow_incomplete: bool = False, checksums: dict | None = None) -> None:
        self.path = str(path)
        self.metadata = metadata
        self.allow_incomplete = allow_incomplete
        # {"index": record, "parts": {part: record}} from the manifest (none: not checked)
        self.checksums = checksums or {}
        self._index: dict | None = None
        self._parts: dict[int, Any] = {}

    @classmethod
    def open(cls, path: str | os.PathLike, *, expect: dict | None = None,
             allow_incomplete: bool = False) -> FeatureStore:
        """Open the store at ``path``; refuse one whose metadata differs from ``expect``
        (a ``ValueError`` naming each mismatching field) or that is not complete."""
        loc = StoreLocation(path)
        if not loc.exists(METADATA):
            raise FileNotFoundError(f"no feature store at {path} (missing {METADATA}); "
                                    "run `elmm-ray extract` first")
        metadata = read_json_or_none(loc, METADATA)
        if metadata is None:
            raise CorruptionError(f"{loc.path(METADATA)} is not valid JSON (truncated or "
                                  "corrupt); rerun `elmm-ray extract` (it rebuilds the store)")
        checksums: dict = {}
        if not allow_incomplete:
            manifest = read_json_or_none(loc, MANIFEST) or {}
            if manifest.get("status") != "complete" or manifest.get(
                    "fingerprint") != metadata.get("fingerprint"):
                raise RuntimeError(f"the feature store at {path} is incomplete; re-run "
                                   "`elmm-ray extract` (it resumes)")
            checksums = manifest.get("checksums") or {}
        check_metadata(metadata, expect or {}, str(path))
        return cls(path, metadata, allow_incomplete=allow_incomplete, checksums=checksums)

    def __getstate__(self) -> dict:
        return {"path": self.path, "metadata": self.metadata,
                "allow_incomplete": self.allow_incomplete, "checksums": self.checksums}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["metadata"],
                      allow_incomplete=state["allow_incomplete"],
                      checksums=state.get("checksums"))

    @property
    def num_entities(self) -> int:
        return int(self.metadata["num_entities"])

    @property
    def max_images(self) -> int:
        return max(int(self.metadata["max_images_per_entity"]), 1)

    @property
    def feature_shape(self) -> tuple[int, int]:
        return int(self.metadata["tokens"]), int(self.metadata["width"])

    @property
    def num_images(self) -> int:
        return int((self._load_index()["slot_part"] >= 0).sum())

    def index_table(self) -> pa.Table:
        """Every stored row: entity, entity_id, image_index, part, row (failed ones left out)."""
        return self._load_index()["table"]

    def _load_index(self) -> dict:
        if self._index is not None:
            return self._index
        loc = StoreLocation(self.path)
        if loc.exists(INDEX):
            data = loc.read_bytes(INDEX)
            expected = self.checksums.get("index")
            if expected and (len(data) != expected["bytes"]
                             or hashlib.sha256(data).hexdigest() != expected["sha256"]):
                loc.delete(MANIFEST)
                loc.fs.move(loc.path(INDEX), loc.path(INDEX + CORRUPT_SUFFIX))
                raise CorruptionError(
                    f"corrupt file {loc.path(INDEX)}: {len(data)} bytes / sha256 does not match "
                    "the manifest (moved aside); rerun `elmm-ray extract`: it rebuilds the "
                    "index from the committed parts")
            table = pq.read_table(pa.BufferReader(data))
        elif self.allow_incomplete:
            table, _ = read_fragments(loc)
        else:
            raise FileNotFoundError(f"{self.path} has no {INDEX}")
        table = table.filter(pc.greater_equal(table["row"], 0))
        table = table.sort_by([("entity", "ascending"), ("image_index", "ascending")])
        parts = sorted(set(table["part"].to_pylist()))
        part_id = {p: i for i, p in enumerate(parts)}
        entity = table["entity"].to_numpy().astype(np.int64)
        part = np.array([part_id[p] for p in table["part"].to_pylist()], dtype=np.int32)
        row = table["row"].to_numpy().astype(np.int32)
        slot_part = np.full((self.num_entities, self.max_images), -1, dtype=np.int32)
        slot_row = np.zeros((self.num_entities, self.max_images), dtype=np.int32)
        if len(entity):
            if entity.max() >= self.num_entities:
                raise ValueError(f"{self.path}: index names entity {entity.max()} but the store "
                                 f"has {self.num_entities} entities")
            starts = np.r_[0, np.flatnonzero(np.diff(entity)) + 1]
            slot = np.arange(len(entity)) - np.repeat(starts, np.diff(np.r_[starts, len(entity)]))
            keep = slot < self.max_images
            slot_part[entity[keep], slot[keep]] = part[keep]
            slot_row[entity[keep], slot[keep]] = row[keep]
        self._index = {"table": table, "parts": parts, "slot_part": slot_part,
                       "slot_row": slot_row}
        return self._index

    def _part(self, pid: int) -> Any:
        array = self._parts.get(pid)
        if array is None:
            loc = StoreLocation(self.path)
            part = self._load_index()["parts"][pid]
            rel = posixpath.join(PARTS, part + ".npy")
            self._check_part(loc, part, rel)
            record = self.checksums.get("parts", {}).get(part) or {}
            local = loc.path(rel) if loc.is_local else cached_copy(  # a node-local copy
                loc.fs, loc.path(rel), record.get("bytes"), record.get("sha256"))
            array = np.load(local, mmap_mode="r") if local else _RemoteRows(loc.fs, loc.path(rel))
            self._parts[pid] = array
        return array

    def _check_part(self, loc: StoreLocation, part: str, rel: str) -> None:
        """The part's size (and on the local disk its sha256) against the manifest; a bad
        part is taken out of the committed set (:func:`uncommit_part`) and named."""
        expected = self.checksums.get("parts", {}).get(part)
        if not expected:
            return
        size, full = loc.fs.get_file_info(loc.path(rel)).size, loc.is_local and os.environ.get(
            "ELMM_VERIFY_PARTS", "full") != "size"  # "size": no hash; "every"; else once a node
        if size != expected["bytes"] or (full and not verified_sha256(loc.path(rel),
                                                                     expected["sha256"])):
            uncommit_part(loc, part)
            raise CorruptionError(
                f"corrupt feature-store part {loc.path(rel)}: {size} bytes or its sha256 differ "
                f"from the record of its commit (moved aside, store marked incomplete); "
                f"{REEXTRACT_HINT}")

    def features_for(self, entity_ids: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded features (float32) and image mask of a batch of entities."""
        import torch

        ids = torch.as_tensor(entity_ids, dtype=torch.long).cpu().numpy().reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_entities):
            raise IndexError(f"entity ids must lie in [0, {self.num_entities})")
        index = self._load_index()
        parts, rows = index["slot_part"][ids], index["slot_row"][ids]
        tokens, width = self.feature_shape
        out = np.zeros((len(ids), self.max_images, tokens, width), dtype=np.float32)
        mask = parts >= 0
        for pid in np.unique(parts[mask]):
            where = parts == pid
            wanted = rows[where]
            order = np.argsort(wanted, kind="stable")  # sorted reads from the part
            values = np.empty((len(wanted), tokens, width), dtype=np.float32)
            values[order] = self._part(int(pid))[wanted[order]]
            out[where] = values
        return torch.from_numpy(out), torch.from_numpy(mask)

    def to_feature_bank(self):
        """Everything in memory as a :class:`FeatureBank` (small stores only)."""
        import torch

        from elmm_ray.data.image_features import FeatureBank

        feats, mask = self.features_for(torch.arange(self.num_entities))
        return FeatureBank(feats.half(), mask)


def check_metadata(metadata: dict, expect: dict, where: str = "the feature store") -> None:
    """Raise ``ValueError`` listing every field of ``expect`` that ``metadata`` contradicts."""
    problems = [f"{key}: store has {metadata.get(key)!r}, the model config wants {value!r}"
                for key, value in expect.items() if metadata.get(key) != value]
    if problems:
        raise ValueError(f"feature store {where} does not match the model config (re-run "
                         "`elmm-ray extract` for this config):\n  " + "\n  ".join(problems))

"""Visual feature extraction with Ray Data, and the feature store it writes.

Extraction (``elmm-ray extract``) streams the packed image shards through three Ray Data
operators::

    read_parquet + decode/preprocess (CPU tasks)
        -> frozen vision tower (actor pool, the backbone loaded once per actor)
        -> part writer (CPU tasks: one ``.npy`` part + its index fragment per batch)

Only small per-part summaries reach the driver, so memory stays bounded whatever the
dataset size. The store is a directory (local path or a ``pyarrow.fs`` URI)::

    metadata.json                 backbone, vision-weights fingerprint, layer, pool, shapes, ...
    parts/part-<hash>.npy         fp16 (rows, tokens, width), memory-mappable
    parts/part-<hash>.index.parquet   (entity, entity_id, image_index, row, reason) of the part
    index.parquet                 all fragments merged, written when the run completes
    manifest.json                 counts of every image (done / skipped / failed), last

A part is committed when its index fragment exists (both files are written through a
temporary name and renamed). A re-run keeps every committed part and feeds only the
missing images into the pipeline; a complete store with the same fingerprint is reused
as it is. :class:`FeatureStore` serves ``features_for(entity_ids)`` like
:class:`elmm_ray.data.image_features.FeatureBank`, reading only the rows it needs.

The entity-table initialisation pass (:func:`encode_entities_ray`) runs the untrained
model over every entity with the same actor-pool pattern.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

if TYPE_CHECKING:  # torch is imported where it is used: the writer tasks do without it
    import torch

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
# The fields of metadata.json that decide whether stored features can be reused.
FINGERPRINT_FIELDS = (
    "version", "weights_fingerprint", "layer", "pool", "model_dtype", "tokens", "width",
    "image_size", "max_images_per_entity", "num_entities", "pack_fingerprint",
)


def image_keys(entity: np.ndarray, image_index: np.ndarray) -> np.ndarray:
    """One int64 per (entity, image_index)."""
    return (np.asarray(entity, dtype=np.int64) << 16) | np.asarray(image_index, dtype=np.int64)


# ------------------------------------------------------------------------------ storage


class _Location:
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


def _write_npy(stream: Any, array: np.ndarray) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False,
              "shape": tuple(array.shape)}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    stream.write(buf.getvalue())
    stream.write(np.ascontiguousarray(array).tobytes())


class _RemoteRows:
    """Row access to an ``.npy`` part through ``read_at`` (no memory map off the local disk)."""

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


def _read_fragments(loc: _Location) -> tuple[pa.Table, list[str]]:
    """The committed index fragments (with a ``part`` column) and their part names."""
    names = [n for n in loc.list(PARTS) if n.endswith(FRAGMENT_SUFFIX) and not n.startswith(".")]
    tables, parts = [], []
    for name in names:
        part = name[: -len(FRAGMENT_SUFFIX)]
        table = pq.read_table(pa.BufferReader(loc.read_bytes(posixpath.join(PARTS, name))))
        table = table.cast(INDEX_SCHEMA)
        tables.append(table.append_column("part", pa.array([part] * table.num_rows, pa.string())))
        parts.append(part)
    if not tables:
        empty = INDEX_SCHEMA.append(pa.field("part", pa.string())).empty_table()
        return empty, []
    return pa.concat_tables(tables), parts


# ------------------------------------------------------------------------------ metadata


def vision_weights_fingerprint(source: str, dtype: str = "float32") -> str:
    """sha256 over the vision tower's tensors (names, dtypes, shapes, bytes).

    Read straight from the checkpoint's safetensors files when there are any (no model is
    built); otherwise the backbone is loaded and its vision tower's state_dict is hashed.
    """
    files = _vision_safetensors_files(source)
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


def _vision_safetensors_files(source: str) -> list[str]:
    path = Path(source).expanduser()
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return sorted({str(path / f) for k, f in weight_map.items() if "vision_tower." in k})
        return sorted(str(p) for p in path.glob("*.safetensors"))
    try:  # a hub id: fetch (or find in the cache) only the files holding the vision tower
        from huggingface_hub import hf_hub_download

        try:
            index = hf_hub_download(source, "model.safetensors.index.json")
        except Exception:  # noqa: BLE001 - single-file checkpoint (or no safetensors)
            return [hf_hub_download(source, "model.safetensors")]
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        files = sorted({f for k, f in weight_map.items() if "vision_tower." in k})
        return [hf_hub_download(source, f) for f in files]
    except Exception as err:  # noqa: BLE001 - fall back to loading the model
        log.info("no safetensors for %s (%s); hashing the loaded vision tower", source, err)
        return []


def vision_geometry(source: str, pool: int, layer: int) -> dict:
    """``image_size``, ``tokens`` and ``width`` of the features of backbone ``source``."""
    from transformers import AutoConfig

    from elmm_ray.models.backbone import num_image_tokens

    vision = AutoConfig.from_pretrained(source).vision_config
    layers = vision.num_hidden_layers
    if not -(layers + 1) <= layer <= layers:
        raise ValueError(f"vision_feature_layer {layer} is outside the {layers}-layer tower "
                         f"(hidden states -{layers + 1}..{layers})")
    return {"image_size": int(vision.image_size),
            "tokens": num_image_tokens(vision.image_size, vision.patch_size, pool),
            "width": int(vision.hidden_size)}


def store_fingerprint(metadata: dict) -> str:
    payload = json.dumps({k: metadata.get(k) for k in FINGERPRINT_FIELDS}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def expected_metadata(cfg: Any, source: str, *, check_weights: bool = True) -> dict:
    """What a model of ``cfg`` over backbone ``source`` needs from a feature store."""
    expect = {"layer": cfg.model.vision_feature_layer, "pool": cfg.model.feature_pool,
              "max_images_per_entity": cfg.images.max_images_per_entity}
    geometry = vision_geometry(source, cfg.model.feature_pool, cfg.model.vision_feature_layer)
    expect.update(tokens=geometry["tokens"], width=geometry["width"])
    if check_weights:
        expect["weights_fingerprint"] = vision_weights_fingerprint(source, cfg.model.dtype)
    return expect


def open_feature_store(cfg: Any, source: str, path: str | None = None) -> FeatureStore:
    """The complete feature store of ``cfg`` (default location), checked against the model
    of ``cfg`` over backbone ``source`` (see ``train.context.backbone_source``)."""
    return FeatureStore.open(path or default_store_dir(cfg), expect=expected_metadata(cfg, source))


def default_store_dir(cfg: Any) -> str:
    """``images.feature_store`` when the config has it, else ``<run_dir>/features``."""
    configured = getattr(cfg.images, "feature_store", "")
    if configured:
        return configured if "://" in configured else str(Path(configured).expanduser().resolve())
    return str(Path(cfg.run_dir).expanduser().resolve() / "features")


# ------------------------------------------------------------------------------ the store


class FeatureStore:
    """Random access to the stored features by entity id.

    ``features_for`` returns what :meth:`FeatureBank.features_for` returns: float32
    ``(B, max_images, tokens, width)`` and a bool mask ``(B, max_images)``. Local parts are
    memory-mapped; a pickled store carries only its path and reopens on first use.
    """

    def __init__(self, path: str | os.PathLike, metadata: dict, *,
                 allow_incomplete: bool = False) -> None:
        self.path = str(path)
        self.metadata = metadata
        self.allow_incomplete = allow_incomplete
        self._index: dict | None = None
        self._parts: dict[int, Any] = {}

    @classmethod
    def open(cls, path: str | os.PathLike, *, expect: dict | None = None,
             allow_incomplete: bool = False) -> FeatureStore:
        """Open the store at ``path``; refuse one whose metadata differs from ``expect``
        (a ``ValueError`` naming each mismatching field) or that is not complete."""
        loc = _Location(path)
        if not loc.exists(METADATA):
            raise FileNotFoundError(f"no feature store at {path} (missing {METADATA}); "
                                    "run `elmm-ray extract` first")
        metadata = loc.read_json(METADATA)
        if not allow_incomplete:
            manifest = loc.read_json(MANIFEST) if loc.exists(MANIFEST) else {}
            if manifest.get("status") != "complete" or manifest.get(
                    "fingerprint") != metadata.get("fingerprint"):
                raise RuntimeError(f"the feature store at {path} is incomplete; re-run "
                                   "`elmm-ray extract` (it resumes)")
        check_metadata(metadata, expect or {}, str(path))
        return cls(path, metadata, allow_incomplete=allow_incomplete)

    def __getstate__(self) -> dict:
        return {"path": self.path, "metadata": self.metadata,
                "allow_incomplete": self.allow_incomplete}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["metadata"],
                      allow_incomplete=state["allow_incomplete"])

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
        loc = _Location(self.path)
        if loc.exists(INDEX):
            table = pq.read_table(pa.BufferReader(loc.read_bytes(INDEX)))
        elif self.allow_incomplete:
            table, _ = _read_fragments(loc)
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
            loc = _Location(self.path)
            rel = posixpath.join(PARTS, self._load_index()["parts"][pid] + ".npy")
            if loc.is_local:
                array = np.load(loc.path(rel), mmap_mode="r")
            else:
                array = _RemoteRows(loc.fs, loc.path(rel))
            self._parts[pid] = array
        return array

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


# ------------------------------------------------------------------------------ extraction


@dataclass
class ExtractResult:
    """What :func:`extract_features` did (also in the store's ``manifest.json``)."""

    store_dir: str
    manifest: dict
    skipped: bool

    def summary_rows(self) -> list[tuple[str, str]]:
        m, c = self.manifest, self.manifest["counts"]
        rows = [
            ("images listed", f"{c['images_listed']:,}"),
            ("images done (features stored)", f"{c['done']:,}"),
            ("  extracted by this run", f"{m['images_this_run']:,}"),
            ("  reused from committed parts", f"{c['done'] - m['images_this_run_done']:,}"),
            ("images skipped", f"{c['skipped']:,}"),
        ]
        rows += [(f"  {reason}", f"{n:,}") for reason, n in c["skipped_by_reason"].items()]
        rows += [
            ("images failed", f"{c['failed']:,}"),
            ("entities with features", f"{c['entities_with_features']:,}"),
            ("entities without features", f"{c['entities_without_features']:,}"),
            ("feature shape per image", f"{m['tokens']} x {m['width']} fp16"),
            ("parts", f"{m['parts']:,}"),
            ("stored bytes", f"{m['stored_bytes'] / 1e6:.1f} MB"),
            ("seconds", f"{m['seconds']:.1f}"),
            ("status", "already complete (no work)" if self.skipped else "complete"),
        ]
        return rows


def _select_images(shard_dir: Path, pack: dict, max_images: int) -> dict:
    """The packed images, sorted by (entity, image_index), and which ones to extract."""
    columns: dict[str, list] = {"entity": [], "entity_id": [], "image_index": [], "file": []}
    for shard in pack["shards"]:
        file = shard_dir / shard["file"]
        table = pq.read_table(file, columns=["entity", "entity_id", "image_index"])
        for name in ("entity", "entity_id", "image_index"):
            columns[name].extend(table[name].to_pylist())
        columns["file"].extend([str(file)] * table.num_rows)
    entity = np.asarray(columns["entity"], dtype=np.int64)
    index = np.asarray(columns["image_index"], dtype=np.int64)
    order = np.lexsort((index, entity))
    entity, index = entity[order], index[order]
    starts = np.r_[0, np.flatnonzero(np.diff(entity)) + 1] if len(entity) else np.zeros(0, int)
    rank = np.arange(len(entity)) - np.repeat(starts, np.diff(np.r_[starts, len(entity)]))
    return {"entity": entity, "image_index": index,
            "entity_id": np.asarray(columns["entity_id"], dtype=object)[order],
            "file": np.asarray(columns["file"], dtype=object)[order],
            "key": image_keys(entity, index), "selected": rank < max_images}


def _decode_batch(batch: dict, *, todo: np.ndarray, image_size: int) -> pa.Table:
    """Keep the rows still to do; decode + CLIP-preprocess each (a failure is recorded)."""
    from PIL import Image

    from elmm_ray.models.backbone import preprocess_images

    keep = np.isin(image_keys(batch["entity"], batch["image_index"]), todo)
    n = int(keep.sum())
    pixels = np.zeros((n, 3, image_size, image_size), dtype=np.float32)
    errors: list[str] = []
    for i, data in enumerate(batch["image"][keep]):
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                pixels[i] = preprocess_images([img], image_size)[0].numpy()
            errors.append("")
        except Exception as err:  # noqa: BLE001 - any decode failure is recorded, not raised
            errors.append(f"decode failed at extract: {type(err).__name__}: {err}")
    return _rows_table(batch["entity"][keep], batch["entity_id"][keep],
                       batch["image_index"][keep], errors, "pixels", pixels)


def _rows_table(entity: Any, entity_id: Any, image_index: Any, error: Any, name: str,
                tensor: np.ndarray) -> pa.Table:
    """A block with explicit types (an empty numpy batch would lose its column types)."""
    from ray.data.extensions import ArrowTensorArray

    return pa.table({
        "entity": pa.array(np.asarray(entity, dtype=np.int32), pa.int32()),
        "entity_id": pa.array([str(e) for e in entity_id], pa.string()),
        "image_index": pa.array(np.asarray(image_index, dtype=np.int16), pa.int16()),
        "error": pa.array([str(e) for e in error], pa.string()),
        name: ArrowTensorArray.from_numpy(tensor),
    })


class _TowerActor:
    """Holds the frozen vision tower (the rest of the backbone is dropped after loading)."""

    def __init__(self, source: str, dtype: str, layer: int, pool: int, tokens: int,
                 width: int, use_gpu: bool, threads: int) -> None:
        import torch
        from transformers.utils import logging as hf_logging

        from elmm_ray.models.backbone import load_backbone, vision_tower_of

        hf_logging.disable_progress_bar()
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.tower = vision_tower_of(load_backbone(source, dtype)).to(self.device).eval()
        self.layer, self.pool, self.tokens, self.width = layer, pool, tokens, width

    def __call__(self, batch: dict) -> pa.Table:
        import torch

        from elmm_ray.models.backbone import encode_images

        ok = np.asarray([not e for e in batch["error"]], dtype=bool)
        features = np.zeros((len(ok), self.tokens, self.width), dtype=FEATURE_DTYPE)
        if ok.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            out = encode_images(self.tower, pixels, layer=self.layer, pool=self.pool)
            features[ok] = out.cpu().numpy()
        return _rows_table(batch["entity"], batch["entity_id"], batch["image_index"],
                           batch["error"], "features", features)


def _write_part(batch: dict, *, store: str) -> dict:
    """Commit one part: the ``.npy`` of the good rows, then its index fragment."""
    loc = _Location(store)
    keys = image_keys(batch["entity"], batch["image_index"])
    name = "part-" + hashlib.sha256(np.sort(keys).tobytes()).hexdigest()[:16]
    ok = np.asarray([not e for e in batch["error"]], dtype=bool)
    rows = np.full(len(ok), -1, dtype=np.int32)
    rows[ok] = np.arange(int(ok.sum()), dtype=np.int32)
    features = np.asarray(batch["features"])[ok].astype(FEATURE_DTYPE, copy=False)
    loc.write_atomic(posixpath.join(PARTS, name + ".npy"), lambda f: _write_npy(f, features))
    fragment = pa.table({
        "entity": pa.array(batch["entity"], pa.int32()),
        "entity_id": pa.array([str(e) for e in batch["entity_id"]], pa.string()),
        "image_index": pa.array(batch["image_index"], pa.int16()),
        "row": pa.array(rows, pa.int32()),
        "reason": pa.array([str(e) for e in batch["error"]], pa.string()),
    }, schema=INDEX_SCHEMA)
    loc.write_atomic(posixpath.join(PARTS, name + FRAGMENT_SUFFIX),
                     lambda f: pq.write_table(fragment, f))
    return {"part": [name], "rows": [len(ok)], "done": [int(ok.sum())],
            "failed": [int((~ok).sum())]}


def _prepare_store(loc: _Location, metadata: dict) -> None:
    """Keep committed parts of the same fingerprint; wipe anything else of ours."""
    loc.mkdir()
    loc.mkdir(PARTS)
    old = loc.read_json(METADATA) if loc.exists(METADATA) else None
    same = old is not None and old.get("fingerprint") == metadata["fingerprint"]
    if not same:
        if old is not None:
            log.warning("extract: %s holds features of another config (fingerprint %s, now "
                        "%s); rebuilding it", loc.uri, old.get("fingerprint"),
                        metadata["fingerprint"])
        for rel in (MANIFEST, INDEX, METADATA):
            loc.delete(rel)
    else:
        loc.delete(MANIFEST)
        loc.delete(INDEX)
    names = loc.list(PARTS)
    committed = {n[: -len(FRAGMENT_SUFFIX)] for n in names if n.endswith(FRAGMENT_SUFFIX)}
    for name in names:
        orphan = name.startswith(".") or (name.endswith(".npy") and name[:-4] not in committed)
        if not same or orphan:
            loc.delete(posixpath.join(PARTS, name))
    if not same:
        loc.write_json(METADATA, metadata)


def extract_features(
    shard_dir: str | os.PathLike,
    store_dir: str | os.PathLike,
    *,
    backbone: str,
    max_images: int = 10,
    layer: int = -2,
    pool: int = 1,
    dtype: str = "float32",
    actors: int = 1,
    actor_cpus: float = 0.5,
    actor_gpus: float = 0.0,
    actor_threads: int = 0,
    batch_size: int = 32,
    decode_cpus: float = 0.5,
    writer_cpus: float = 0.25,
    part_bytes: int = DEFAULT_PART_BYTES,
    part_rows: int = 0,
    object_store_bytes: int = 0,
    show_progress: bool = True,
    on_part: Callable[[dict], None] | None = None,
) -> ExtractResult:
    """Run the frozen vision tower of ``backbone`` over the packed images of ``shard_dir``
    into the feature store ``store_dir`` (Ray must be initialised).

    ``part_rows`` (else ``part_bytes`` of features) bounds the images per committed part;
    ``object_store_bytes`` (0: a few batches per actor) bounds the pipeline's object-store
    use; ``actor_threads`` > 0 sets torch's threads per actor; ``on_part`` is called on the
    driver with each committed part's summary.
    """
    from elmm_ray.data.shards import read_manifest

    start = time.perf_counter()
    shard_dir = Path(shard_dir).resolve()
    pack = read_manifest(shard_dir)
    geometry = vision_geometry(backbone, pool, layer)
    metadata = {
        "version": STORE_VERSION, "backbone": backbone,
        "weights_fingerprint": vision_weights_fingerprint(backbone, dtype),
        "layer": layer, "pool": pool, "model_dtype": dtype, "feature_dtype": "float16",
        **geometry, "max_images_per_entity": max_images, "num_entities": int(pack["entities"]),
        "pack_fingerprint": pack["fingerprint"], "shard_dir": str(shard_dir),
    }
    metadata["fingerprint"] = store_fingerprint(metadata)
    loc = _Location(store_dir)
    if loc.exists(MANIFEST):
        old = loc.read_json(MANIFEST)
        if old.get("status") == "complete" and old.get("fingerprint") == metadata["fingerprint"]:
            log.info("extract: %s is complete; nothing to do", loc.uri)
            return ExtractResult(loc.uri, old, skipped=True)
    _prepare_store(loc, metadata)

    images = _select_images(shard_dir, pack, max_images)
    committed, _ = _read_fragments(loc)
    done_keys = image_keys(committed["entity"].to_numpy(), committed["image_index"].to_numpy())
    todo = images["selected"] & ~np.isin(images["key"], done_keys)
    row_bytes = geometry["tokens"] * geometry["width"] * np.dtype(FEATURE_DTYPE).itemsize
    rows_per_part = part_rows or max(1, part_bytes // row_bytes)
    log.info("extract: %d images selected, %d in committed parts, %d to do",
             int(images["selected"].sum()), len(done_keys), int(todo.sum()))
    this_run = {"parts": 0, "done": 0, "failed": 0}
    if todo.any():
        files = sorted(set(images["file"][todo]))
        ds = _extraction_dataset(
            files, np.sort(images["key"][todo]), store=loc.uri, backbone=backbone,
            dtype=dtype, layer=layer, pool=pool, geometry=geometry, actors=actors,
            actor_cpus=actor_cpus, actor_gpus=actor_gpus, actor_threads=actor_threads,
            batch_size=batch_size, decode_cpus=decode_cpus, writer_cpus=writer_cpus,
            rows_per_part=rows_per_part, object_store_bytes=object_store_bytes,
            show_progress=show_progress)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["part"])):
                summary = {k: batch[k][i].item() if hasattr(batch[k][i], "item")
                           else batch[k][i] for k in ("part", "rows", "done", "failed")}
                this_run["parts"] += 1
                this_run["done"] += summary["done"]
                this_run["failed"] += summary["failed"]
                if on_part is not None:
                    on_part(summary)
    manifest = _finalize(loc, metadata, pack, images, this_run, time.perf_counter() - start)
    return ExtractResult(loc.uri, manifest, skipped=False)


def _extraction_dataset(files: list[str], todo: np.ndarray, *, store: str, backbone: str,
                        dtype: str, layer: int, pool: int, geometry: dict, actors: int,
                        actor_cpus: float, actor_gpus: float, actor_threads: int,
                        batch_size: int, decode_cpus: float, writer_cpus: float,
                        rows_per_part: int, object_store_bytes: int, show_progress: bool):
    import ray

    cpus = ray.cluster_resources().get("CPU", 0.0)
    spare = cpus - actors * actor_cpus
    if cpus and spare < 1.0:
        # The repartition tasks take 1 CPU; a pool holding more than the rest stalls them
        # silently (MEASURED.md, Ray Data: "Hang").
        log.warning("extract: %d actors x %.2f CPU leave less than 1 of the cluster's %.1f "
                    "CPUs for reading and decoding; the pipeline may stall (lower "
                    "ray.data_actors or ray.data_actor_cpus)", actors, actor_cpus, cpus)
    # Bounded task pools: each concurrent task is a worker process (with torch imported
    # for decoding), so the process count, and memory, must not grow with the run.
    decode_tasks = max(1, int(spare / decode_cpus)) if cpus else None
    pixel_bytes = batch_size * 3 * geometry["image_size"] ** 2 * 4
    ds = ray.data.read_parquet(files, columns=["entity", "entity_id", "image_index", "image"],
                               num_cpus=decode_cpus)
    ctx = ds.context  # this dataset's own copy of the DataContext
    ctx.enable_progress_bars = show_progress
    # Decoding runs ahead of the actors until Ray Data's object-store budget is full; a
    # budget of a few batches per actor keeps memory flat whatever the dataset size.
    feature_bytes = batch_size * geometry["tokens"] * geometry["width"] * 2
    budget = object_store_bytes or max(256 * 2**20,
                                       8 * max(1, actors) * max(pixel_bytes, feature_bytes))
    # ... and room for two parts, which the writer gathers before writing.
    budget = max(budget, 2 * rows_per_part * geometry["tokens"] * geometry["width"] * 2)
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=budget)
    # One block per batch of encoded images (a shard is one block): the batches decode in
    # parallel and reach the actors as they are ready.
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    ds = ds.map_batches(_decode_batch, batch_size=batch_size, batch_format="numpy",
                        fn_kwargs={"todo": todo, "image_size": geometry["image_size"]},
                        compute=ray.data.TaskPoolStrategy(size=decode_tasks),
                        num_cpus=decode_cpus,
                        # A decode worker holds torch + transformers (~350 MB) and batches of
                        # pixels. A memory request unlike the actors' also keeps Ray from
                        # fusing decoding into the actors: it must overlap inference.
                        memory=512 * 2**20 + 2 * pixel_bytes)
    ds = ds.map_batches(
        _TowerActor, batch_size=batch_size, batch_format="numpy",
        fn_constructor_kwargs={
            "source": backbone, "dtype": dtype, "layer": layer, "pool": pool,
            "tokens": geometry["tokens"], "width": geometry["width"],
            "use_gpu": actor_gpus > 0, "threads": actor_threads},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        num_cpus=actor_cpus, num_gpus=actor_gpus)
    return ds.map_batches(_write_part, batch_size=rows_per_part, batch_format="numpy",
                          fn_kwargs={"store": store}, num_cpus=writer_cpus,
                          compute=ray.data.TaskPoolStrategy(size=max(1, actors)))


def _finalize(loc: _Location, metadata: dict, pack: dict, images: dict, this_run: dict,
              seconds: float) -> dict:
    """Merge the fragments into ``index.parquet``, check the accounting, write the manifest."""
    fragments, parts = _read_fragments(loc)
    fragments = fragments.sort_by([("part", "ascending")])
    keys = image_keys(fragments["entity"].to_numpy(), fragments["image_index"].to_numpy())
    _, first = np.unique(keys, return_index=True)
    duplicates = len(keys) - len(first)
    if duplicates:
        log.warning("extract: %d rows committed twice (a retried part); keeping the first",
                    duplicates)
        fragments = fragments.take(np.sort(first))
        keys = keys[np.sort(first)]
    selected = images["key"][images["selected"]]
    missing = np.setdiff1d(selected, keys)
    extra = np.setdiff1d(keys, selected)
    if len(missing) or len(extra):
        raise RuntimeError(f"extract accounting mismatch in {loc.uri}: {len(missing)} selected "
                           f"images without a committed row, {len(extra)} rows not selected")
    row = fragments["row"].to_numpy()
    stored = fragments.filter(pc.greater_equal(fragments["row"], 0))
    stored = stored.sort_by([("entity", "ascending"), ("image_index", "ascending")])
    loc.write_atomic(INDEX, lambda f: pq.write_table(stored, f))

    max_images = metadata["max_images_per_entity"]
    beyond = [{"entity_id": str(e), "image_index": int(i),
               "reason": f"beyond max_images_per_entity ({max_images})"}
              for e, i in zip(images["entity_id"][~images["selected"]],
                              images["image_index"][~images["selected"]])]
    bad = [{**b, "reason": f"bad at pack: {b['reason']}"} for b in pack["bad_images"]]
    failed_rows = fragments.filter(pc.less(fragments["row"], 0))
    failed = [{"entity_id": e, "image_index": int(i), "reason": r} for e, i, r in zip(
        failed_rows["entity_id"].to_pylist(), failed_rows["image_index"].to_pylist(),
        failed_rows["reason"].to_pylist())]
    by_reason = {"bad at pack time": len(bad),
                 f"beyond max_images_per_entity ({max_images})": len(beyond)}
    done = int((row >= 0).sum())
    with_features = len(np.unique(stored["entity"].to_numpy()))
    counts = {
        "images_listed": int(pack["images_listed"]), "done": done,
        "skipped": len(bad) + len(beyond), "skipped_by_reason": by_reason,
        "failed": len(failed), "entities": metadata["num_entities"],
        "entities_with_features": with_features,
        "entities_without_features": metadata["num_entities"] - with_features,
    }
    if done + counts["skipped"] + counts["failed"] != counts["images_listed"]:
        raise RuntimeError(f"extract accounting mismatch: {done} done + {counts['skipped']} "
                           f"skipped + {counts['failed']} failed != "
                           f"{counts['images_listed']} listed")
    stored_bytes = sum(loc.fs.get_file_info(loc.path(PARTS, p + ".npy")).size for p in parts)
    manifest = {
        "status": "complete", "fingerprint": metadata["fingerprint"], "store": loc.uri,
        "backbone": metadata["backbone"], "weights_fingerprint": metadata["weights_fingerprint"],
        "tokens": metadata["tokens"], "width": metadata["width"], "counts": counts,
        "parts": len(parts), "parts_this_run": this_run["parts"],
        "images_this_run": this_run["done"] + this_run["failed"],
        "images_this_run_done": this_run["done"], "duplicates_dropped": int(duplicates),
        "stored_bytes": int(stored_bytes), "seconds": seconds,
        "skipped_images": bad + beyond[:1000], "skipped_images_truncated": len(beyond) > 1000,
        "failed_images": failed,
    }
    loc.write_json(MANIFEST, manifest)  # last: its presence marks a complete store
    return manifest


# ------------------------------------------------------------------------------ entity init


class _EntityEncoder:
    """Builds the (untrained, seeded) ELMM once and encodes batches of entity ids."""

    def __init__(self, config: dict, kg: Any, run_dir: str, shard_dir: str, store: str,
                 expect: dict, use_gpu: bool, threads: int) -> None:
        import torch
        from transformers.utils import logging as hf_logging

        from elmm_ray.config import config_from_dict
        from elmm_ray.rundir import RunDir
        from elmm_ray.train.context import build_context

        hf_logging.disable_progress_bar()
        if threads > 0:
            torch.set_num_threads(threads)
        cfg = config_from_dict(config)
        self.features = FeatureStore.open(store, expect=expect)
        ctx = build_context(cfg, kg, RunDir(run_dir), Path(shard_dir), features=self.features)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = ctx.model.to(self.device).eval()
        self.collator = ctx.collator

    def __call__(self, batch: dict) -> dict:
        import torch

        ids = torch.from_numpy(np.array(batch["id"], dtype=np.int64))
        feats, mask = self.features.features_for(ids)
        inputs = self.collator.entity_batch(ids, feats, mask)
        with torch.no_grad():
            vectors = self.model.encode_entities(
                {k: v.to(self.device) for k, v in inputs.items()})
        return {"entity": ids.numpy(), "vector": vectors.float().cpu().numpy()}


def encode_entities_ray(cfg: Any, kg: Any, *, run_dir: str, shard_dir: str, store: str,
                        expect: dict, actor_threads: int = 0,
                        show_progress: bool = True) -> torch.Tensor:
    """Every entity's own encoding ``(E, embed_dim)`` float32, rows in entity-id order,
    computed by a Ray Data actor pool (each actor builds the model once)."""
    import ray
    import torch

    from elmm_ray.config import config_to_dict

    num = kg.num_entities
    batch_size = cfg.ray.data_batch_size
    blocks = max(1, min(-(-num // batch_size), 64))
    ds = ray.data.range(num, override_num_blocks=blocks)
    ds.context.enable_progress_bars = show_progress
    ds = ds.map_batches(
        _EntityEncoder, batch_size=batch_size, batch_format="numpy",
        fn_constructor_kwargs={
            "config": config_to_dict(cfg), "kg": kg, "run_dir": run_dir,
            "shard_dir": shard_dir, "store": store, "expect": expect,
            "use_gpu": cfg.ray.data_actor_gpus > 0, "threads": actor_threads},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.ray.data_actors),
        num_cpus=cfg.ray.data_actor_cpus, num_gpus=cfg.ray.data_actor_gpus)
    table: torch.Tensor | None = None
    seen = np.zeros(num, dtype=np.int64)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        entity = np.array(batch["entity"], dtype=np.int64)
        vectors = torch.from_numpy(np.array(batch["vector"], dtype=np.float32))
        if table is None:
            table = torch.zeros(num, vectors.shape[1], dtype=torch.float32)
        table[torch.from_numpy(entity)] = vectors
        np.add.at(seen, entity, 1)
    if not (seen == 1).all():
        raise RuntimeError(f"entity encoding: {int((seen == 0).sum())} entities missing, "
                           f"{int((seen > 1).sum())} encoded more than once")
    assert table is not None
    return table

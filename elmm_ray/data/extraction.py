"""Visual feature extraction with Ray Data into the feature store
(:mod:`elmm_ray.data.feature_store`).

Extraction (``elmm-ray extract``) streams the packed image shards through three Ray Data
operators::

    read_parquet + decode/preprocess (CPU tasks)
        -> frozen vision tower (actor pool, the backbone loaded once per actor)
        -> part writer (CPU tasks: one ``.npy`` part + its index fragment per batch)

Only small per-part summaries reach the driver, so memory stays bounded whatever the
dataset size. A re-run keeps every committed part and feeds only the missing images into
the pipeline; a complete store with the same fingerprint is reused as it is.
"""


from __future__ import annotations

import hashlib
import io
import logging
import os
import posixpath
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

if TYPE_CHECKING:  # torch is imported where it is used: the writer tasks do without it
    pass

from elmm_ray import console
from elmm_ray.data.feature_store import (
    DEFAULT_PART_BYTES,
    FEATURE_DTYPE,
    FRAGMENT_SUFFIX,
    INDEX,
    INDEX_SCHEMA,
    MANIFEST,
    METADATA,
    PARTS,
    STORE_VERSION,
    StoreLocation,
    image_keys,
    read_fragments,
    read_json_or_none,
    store_fingerprint,
    vision_geometry,
    vision_weights_fingerprint,
    write_index,
    write_part,
)
from elmm_ray.faults import fault_point

log = logging.getLogger(__name__)


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


def _decode_batch(batch: dict, *, todo: np.ndarray, pixel_spec: dict) -> pa.Table:
    """Keep the rows still to do; decode + preprocess each as the tower wants
    (:class:`~elmm_ray.data.pixels.PixelSpec`; a failure is recorded)."""
    from PIL import Image

    from elmm_ray.data.pixels import PixelSpec, tower_pixels  # PIL + numpy only

    spec = PixelSpec.from_dict(pixel_spec)
    keep = np.isin(image_keys(batch["entity"], batch["image_index"]), todo)
    n = int(keep.sum())
    pixels = np.zeros((n, 3, spec.height, spec.width), dtype=np.float32)
    errors: list[str] = []
    for i, data in enumerate(batch["image"][keep]):
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                pixels[i] = tower_pixels([img], spec)[0]
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


# The extract actors read their blocks without Ray Data's writable copy of the pixels (the
# tower only reads them): 1.35 MB per 336 px image not copied on the way in.
ACTOR_ZERO_COPY_BATCH = True


class _TowerActor:
    """Holds the frozen vision tower (the rest of the backbone is dropped after loading)."""

    def __init__(self, source: str, dtype: str, layer: int, pool: int, tokens: int,
                 width: int, use_gpu: bool, threads: int, mirror: Any = None) -> None:
        import torch
        from transformers.utils import logging as hf_logging

        from elmm_ray.data.feature_store import vision_safetensors_files
        from elmm_ray.models.backbone import load_backbone, load_vision_tower, vision_tower_of

        hf_logging.disable_progress_bar()
        if mirror is not None:  # the backbone in a remote run directory: into this node's mirror
            mirror.pull(Path(source).relative_to(mirror.local).as_posix())
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        files = vision_safetensors_files(source)  # the tower alone, not the whole LLaVA
        tower = (load_vision_tower(source, files, dtype) if files
                 else vision_tower_of(load_backbone(source, dtype)))
        self.tower = tower.to(self.device).eval()
        self.layer, self.pool, self.tokens, self.width = layer, pool, tokens, width

    def __call__(self, batch: dict) -> pa.Table:
        """The tower over a block's decoded rows. The host work around the forward is kept
        to the copies it needs (bench/bench_extract_call.py): the batch is Ray Data's
        read-only view of the block (``ACTOR_ZERO_COPY_BATCH``) and goes to the tower whole,
        rows that failed to decode included (their pixels are zeros; rare, so a wasted row of
        compute costs less than selecting the others, a copy of the block); their features
        are zeroed (the writer stores only the good rows)."""
        import torch

        from elmm_ray.models.backbone import encode_images

        ok = np.asarray([not e for e in batch["error"]], dtype=bool)
        if not ok.any():
            features = np.zeros((len(ok), self.tokens, self.width), dtype=FEATURE_DTYPE)
        else:
            with warnings.catch_warnings():  # read-only: the tower never writes its input
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"]))
            out = encode_images(self.tower, pixels, layer=self.layer, pool=self.pool)
            features = out.cpu().numpy().astype(FEATURE_DTYPE, copy=False)
            features[~ok] = 0
        return _rows_table(batch["entity"], batch["entity_id"], batch["image_index"],
                           batch["error"], "features", features)


def _write_part(batch: dict, *, store: str) -> dict:
    """Commit one part: the ``.npy`` of the good rows, then its index fragment."""
    loc = StoreLocation(store)
    keys = image_keys(batch["entity"], batch["image_index"])
    name = "part-" + hashlib.sha256(np.sort(keys).tobytes()).hexdigest()[:16]
    ok = np.asarray([not e for e in batch["error"]], dtype=bool)
    rows = np.full(len(ok), -1, dtype=np.int32)
    rows[ok] = np.arange(int(ok.sum()), dtype=np.int32)
    features = np.asarray(batch["features"])
    if not ok.all():  # whole rows by index (a boolean mask over 3-D rows copies slowly)
        features = np.take(features, np.flatnonzero(ok), axis=0)
    features = features.astype(FEATURE_DTYPE, copy=False)
    fragment = pa.table({
        "entity": pa.array(batch["entity"], pa.int32()),
        "entity_id": pa.array([str(e) for e in batch["entity_id"]], pa.string()),
        "image_index": pa.array(batch["image_index"], pa.int16()),
        "row": pa.array(rows, pa.int32()),
        "reason": pa.array([str(e) for e in batch["error"]], pa.string()),
    }, schema=INDEX_SCHEMA)
    write_part(loc, name, features, fragment)
    fault_point("extract.write")
    return {"part": [name], "rows": [len(ok)], "done": [int(ok.sum())],
            "failed": [int((~ok).sum())]}


def _prepare_store(loc: StoreLocation, metadata: dict) -> None:
    """Keep committed parts of the same fingerprint; wipe anything else of ours."""
    loc.mkdir()
    loc.mkdir(PARTS)
    old = read_json_or_none(loc, METADATA)
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
    mirror: Any = None,
) -> ExtractResult:
    """Run the frozen vision tower of ``backbone`` over the packed images of ``shard_dir``
    into the feature store ``store_dir`` (Ray must be initialised).

    ``part_rows`` (else ``part_bytes`` of features) bounds the images per committed part;
    ``object_store_bytes`` (0: a few batches per actor) bounds the pipeline's object-store
    use; ``actor_threads`` > 0 sets torch's threads per actor; ``on_part`` is called on the
    driver with each committed part's summary. ``mirror``: the run directory's
    :class:`~elmm_ray.remote.RemoteMirror` when it is on object storage: shards and backbone
    inside it are read from there on every node (the pushed copies).
    """
    from elmm_ray.data.shards import read_manifest, verify_shards

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
    loc = StoreLocation(store_dir)
    old = read_json_or_none(loc, MANIFEST)
    if old and old.get("status") == "complete" and old.get("fingerprint") == metadata[
            "fingerprint"]:
        log.info("extract: %s is complete; nothing to do", loc.uri)
        return ExtractResult(loc.uri, old, skipped=True)
    # The shards are read below: check them against their recorded digests first.
    check = verify_shards(shard_dir, pack)
    log.info("extract: %d shards (%.1f MB) verified in %.2f s (%.0f MB/s)", check["shards"],
             check["bytes"] / 1e6, check["seconds"],
             check["bytes"] / 1e6 / max(check["seconds"], 1e-9))
    _prepare_store(loc, metadata)

    images = _select_images(shard_dir, pack, max_images)
    committed, _ = read_fragments(loc)
    done_keys = image_keys(committed["entity"].to_numpy(), committed["image_index"].to_numpy())
    todo = images["selected"] & ~np.isin(images["key"], done_keys)
    row_bytes = geometry["tokens"] * geometry["width"] * np.dtype(FEATURE_DTYPE).itemsize
    rows_per_part = part_rows or max(1, part_bytes // row_bytes)
    log.info("extract: %d images selected, %d in committed parts, %d to do",
             int(images["selected"].sum()), len(done_keys), int(todo.sum()))
    this_run = {"parts": 0, "done": 0, "failed": 0}
    if todo.any():
        files, filesystem = sorted(set(images["file"][todo])), None
        if mirror is not None and shard_dir.is_relative_to(mirror.local):
            rel = shard_dir.relative_to(mirror.local).as_posix()
            files = [mirror.remote_path(f"{rel}/{Path(f).name}") for f in files]
            filesystem = mirror.fs
        in_mirror = mirror is not None and Path(backbone).is_relative_to(mirror.local)
        ds = _extraction_dataset(
            files, np.sort(images["key"][todo]), store=loc.uri, backbone=backbone,
            filesystem=filesystem, mirror=mirror if in_mirror else None,
            dtype=dtype, layer=layer, pool=pool, geometry=geometry, actors=actors,
            actor_cpus=actor_cpus, actor_gpus=actor_gpus, actor_threads=actor_threads,
            batch_size=batch_size, decode_cpus=decode_cpus, writer_cpus=writer_cpus,
            rows_per_part=rows_per_part, object_store_bytes=object_store_bytes,
            show_progress=show_progress)
        progress = console.StageProgress("extract", int(todo.sum()), "images",
                                         enabled=show_progress)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["part"])):
                summary = {k: batch[k][i].item() if hasattr(batch[k][i], "item")
                           else batch[k][i] for k in ("part", "rows", "done", "failed")}
                this_run["parts"] += 1
                this_run["done"] += summary["done"]
                this_run["failed"] += summary["failed"]
                progress.update(n=summary["done"] + summary["failed"],
                                failed=this_run["failed"])
                if on_part is not None:
                    on_part(summary)
                fault_point("extract.part")
        progress.close()
    manifest = _finalize(loc, metadata, pack, images, this_run, time.perf_counter() - start)
    return ExtractResult(loc.uri, manifest, skipped=False)


def _extraction_dataset(files: list[str], todo: np.ndarray, *, store: str, backbone: str,
                        filesystem: Any, mirror: Any, dtype: str, layer: int, pool: int,
                        geometry: dict, actors: int,
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
                               num_cpus=decode_cpus, filesystem=filesystem)
    ctx = ds.context  # this dataset's own copy of the DataContext
    ctx.enable_progress_bars = show_progress and console.verbose()
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
                        fn_kwargs={"todo": todo, "pixel_spec": geometry["pixels"]},
                        compute=ray.data.TaskPoolStrategy(size=decode_tasks),
                        num_cpus=decode_cpus,
                        # A decode worker holds PIL + numpy (no torch, no transformers: it
                        # starts in under a second) and batches of pixels. A memory request
                        # unlike the actors' also keeps Ray from fusing decoding into the
                        # actors: it must overlap inference.
                        memory=512 * 2**20 + 2 * pixel_bytes)
    ds = ds.map_batches(
        _TowerActor, batch_size=batch_size, batch_format="numpy",
        zero_copy_batch=ACTOR_ZERO_COPY_BATCH,
        fn_constructor_kwargs={
            "source": backbone, "dtype": dtype, "layer": layer, "pool": pool,
            "tokens": geometry["tokens"], "width": geometry["width"],
            "use_gpu": actor_gpus > 0, "threads": actor_threads, "mirror": mirror},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        num_cpus=actor_cpus, num_gpus=actor_gpus)
    return ds.map_batches(_write_part, batch_size=rows_per_part, batch_format="numpy",
                          fn_kwargs={"store": store}, num_cpus=writer_cpus,
                          compute=ray.data.TaskPoolStrategy(size=max(1, actors)))


def _finalize(loc: StoreLocation, metadata: dict, pack: dict, images: dict, this_run: dict,
              seconds: float) -> dict:
    """Merge the fragments into ``index.parquet``, check the accounting, write the manifest."""
    part_checksums: dict = {}
    fragments, parts = read_fragments(loc, part_checksums)
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
    index_record = write_index(loc, stored)

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
        "checksums": {"index": index_record, "parts": part_checksums},
    }
    loc.write_json(MANIFEST, manifest)  # last: its presence marks a complete store
    return manifest

"""Pack entity images into Parquet shards with Ray Data (``elmm-ray pack``).

One row per image: entity id, image index, the original encoded bytes, width, height,
mode, format, source path and a checksum. Every image is decoded once to validate it;
undecodable or degenerate files are listed in the manifest with the reason and left out.

The shard plan is a deterministic function of the image list, so a re-run knows which
shards exist: each shard is written atomically with a sidecar record, and the manifest
is written last. A complete output with the same fingerprint is skipped; an interrupted
run redoes only the shards that are missing, or whose bytes no longer match the sha256
recorded in their sidecar (a corrupt shard is re-packed). Readers check every shard
against the manifest's size and sha256 first (:func:`verify_shards`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from elmm_ray import console
from elmm_ray.data.kg import KnowledgeGraph
from elmm_ray.faults import fault_point
from elmm_ray.integrity import read_json_checked, sha256_file, verify_file
from elmm_ray.layout import read_json, write_json_atomic

log = logging.getLogger(__name__)

PACK_VERSION = 1
MANIFEST = "manifest.json"
SHARD_SCHEMA = pa.schema([
    ("entity", pa.int32()),
    ("entity_id", pa.string()),
    ("image_index", pa.int16()),
    ("image", pa.binary()),
    ("format", pa.string()),
    ("mode", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("source_path", pa.string()),
    ("sha256", pa.string()),
])


@dataclass
class PackResult:
    """What ``pack_images`` did (also written to ``manifest.json``)."""

    out_dir: Path
    manifest: dict
    skipped: bool

    def summary_rows(self) -> list[tuple[str, str]]:
        m = self.manifest
        return [
            ("images listed", str(m["images_listed"])),
            ("images packed", str(m["images_packed"])),
            ("images bad (left out)", str(m["images_bad"])),
            ("entities with images", str(m["entities_with_images"])),
            ("entities without images", str(m["entities_without_images"])),
            ("shards", str(len(m["shards"]))),
            ("shards reused", str(m.get("shards_reused", 0))),
            ("packed bytes", f"{m['packed_bytes'] / 1e6:.1f} MB"),
            ("seconds", f"{m['seconds']:.1f}"),
            ("status", "already complete (no work)" if self.skipped else "complete"),
        ]


def validate_image(data: bytes, min_side: int) -> tuple[dict | None, str]:
    """Decode ``data`` fully (within Pillow's decompression-bomb limit); return (info, "")
    or (None, reason). ``info["orientation"]``: the EXIF orientation preprocessing applies."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        return None, "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, mode = img.format or "", img.mode
                img.load()
                width, height = img.size
                orientation = int(img.getexif().get(0x0112, 1))
                ImageOps.exif_transpose(img)  # what preprocessing will do: it must work too
    except UnidentifiedImageError:
        return None, "not a recognised image format"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return None, (f"decompression bomb: over Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} "
                      f"pixels ({err})")
    except (OSError, SyntaxError, ValueError) as err:
        return None, f"cannot decode: {err}"
    if min(width, height) < min_side:
        return None, f"degenerate size {width}x{height} (a side below {min_side} px)"
    return {"format": fmt, "mode": mode, "width": width, "height": height,
            "orientation": orientation}, ""


def plan_shards(records: list[dict], max_shard_bytes: int) -> list[list[dict]]:
    """Split records (in order) into shards whose file bytes stay under the bound
    (a single larger file gets a shard of its own)."""
    shards: list[list[dict]] = []
    current: list[dict] = []
    size = 0
    for rec in records:
        if current and size + rec["size"] > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(rec)
        size += rec["size"]
    if current:
        shards.append(current)
    return shards


def _fingerprint(items: list, *extra: object) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([PACK_VERSION, *extra], sort_keys=True).encode())
    for item in items:
        h.update(json.dumps(item, sort_keys=True).encode())
    return h.hexdigest()[:20]


_file_sha256 = sha256_file
REPACK_HINT = "rerun `elmm-ray pack` (it re-packs the bad shard), then the command again"


def _read_pack_manifest(path: Path) -> dict | None:
    """The manifest at ``path``, or ``None`` (with a warning) when it is not valid JSON: the
    pack then runs again, reusing every intact shard."""
    try:
        data = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        log.warning("pack: %s is unreadable (%s); packing again (intact shards are reused)",
                    path, err)
        return None
    return data if isinstance(data, dict) else None


def shards_present(out_dir: str | Path, manifest: dict) -> bool:
    """Cheap check (no hashing): every shard of ``manifest`` is there at its recorded size."""
    out_dir = Path(out_dir)
    for shard in manifest.get("shards", []):
        path = out_dir / shard["file"]
        if not path.is_file() or path.stat().st_size != int(shard["bytes"]):
            return False
    return True


def pack_complete(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a complete pack output whose shards are all present."""
    path = Path(out_dir) / MANIFEST
    manifest = _read_pack_manifest(path) if path.is_file() else None
    return bool(manifest and manifest.get("status") == "complete"
                and shards_present(out_dir, manifest))


def verify_shards(shard_dir: str | Path, manifest: dict) -> dict:
    """Check every shard of a pack ``manifest`` against its recorded size and sha256 (one
    read of the shards); a bad shard is moved aside and raises
    :class:`~elmm_ray.integrity.CorruptionError` naming it. Returns bytes and seconds."""
    start = time.perf_counter()
    total = 0
    for shard in manifest["shards"]:
        verify_file(Path(shard_dir) / shard["file"], shard, REPACK_HINT, quarantine_bad=True)
        total += int(shard["bytes"])
    return {"shards": len(manifest["shards"]), "bytes": total,
            "seconds": time.perf_counter() - start}


def _shard_done(out_dir: Path, shard: dict) -> dict | None:
    """The sidecar record of a shard written earlier with the same inputs, if intact."""
    side = out_dir / f"{shard['name']}.json"
    parquet = out_dir / f"{shard['name']}.parquet"
    if not side.is_file() or not parquet.is_file():
        return None
    try:
        rec = read_json(side)
    except (OSError, json.JSONDecodeError):
        return None
    if rec.get("fingerprint") != shard["fingerprint"] or rec.get("sha256") != _file_sha256(
        parquet
    ):
        return None
    return rec


def _in_mirror(mirror: Any, path: str | Path) -> str | None:
    """``path`` relative to ``mirror``'s local root, when it lies inside it."""
    if mirror is None or not Path(path).is_relative_to(mirror.local):
        return None
    return Path(path).relative_to(mirror.local).as_posix()


def pack_shard(shard: dict, mirror: Any = None) -> dict:
    """Read, validate and write one shard (runs as a Ray Data task). ``mirror``: the run
    directory on object storage: image files inside it come from there when this node lacks
    them, and the shard goes there as soon as it is written."""
    out_dir = Path(shard["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}
    bad = []
    for rec in shard["records"]:
        if (rel := _in_mirror(mirror, rec["path"])) is not None:
            with contextlib.suppress(OSError):  # missing remotely too: reported below
                mirror.fetch(rel)
        try:
            data = Path(rec["path"]).read_bytes()
        except OSError as err:
            bad.append({**_bad_fields(rec), "reason": f"unreadable: {err}"})
            continue
        info, reason = validate_image(data, shard["min_side"])
        if info is None:
            bad.append({**_bad_fields(rec), "reason": reason})
            continue
        rows["entity"].append(rec["entity"])
        rows["entity_id"].append(rec["entity_id"])
        rows["image_index"].append(rec["image_index"])
        rows["image"].append(data)
        rows["source_path"].append(rec["path"])
        rows["sha256"].append(hashlib.sha256(data).hexdigest())
        for key in ("format", "mode", "width", "height"):
            rows[key].append(info[key])
    table = pa.table(rows, schema=SHARD_SCHEMA)
    final = out_dir / f"{shard['name']}.parquet"
    tmp = out_dir / f".{shard['name']}.parquet.tmp"
    pq.write_table(table, tmp, compression="none")
    os.replace(tmp, final)
    fault_point("pack.shard")
    record = {
        "name": shard["name"], "file": final.name, "rows": table.num_rows,
        "bytes": final.stat().st_size, "sha256": _file_sha256(final),
        "fingerprint": shard["fingerprint"], "bad": bad,
    }
    write_json_atomic(out_dir / f"{shard['name']}.json", record)
    if (rel := _in_mirror(mirror, out_dir)) is not None:
        for name in (final.name, f"{shard['name']}.json"):
            mirror.upload(f"{rel}/{name}")
    return record


def _bad_fields(rec: dict) -> dict:
    return {"path": rec["path"], "entity_id": rec["entity_id"], "image_index": rec["image_index"]}


def image_records(kg: KnowledgeGraph) -> list[dict]:
    """Every listed image file of every entity, in entity then file order."""
    records = []
    for ent, files in enumerate(kg.entity_images):
        for idx, path in enumerate(files):
            st = os.stat(path)
            records.append({"entity": ent, "entity_id": kg.entities[ent], "image_index": idx,
                            "path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return records


def pack_images(
    kg: KnowledgeGraph,
    out_dir: str | Path,
    *,
    max_shard_bytes: int = 64 * 1024 * 1024,
    min_side: int = 8,
    num_cpus_per_task: float = 0.5,
    show_progress: bool = True,
    use_ray: bool = True,
    mirror: Any = None,
) -> PackResult:
    """Pack every image of ``kg`` into Parquet shards under ``out_dir`` with Ray Data
    (``use_ray=False``: the same shards, packed one after another in this process).
    ``mirror``: the run directory's :class:`~elmm_ray.remote.RemoteMirror` when it is on
    object storage (tasks on other nodes read and write through it; shards come back here)."""
    start = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    records = image_records(kg)
    fingerprint = _fingerprint(
        [(r["path"], r["size"], r["mtime_ns"]) for r in records], max_shard_bytes, min_side
    )
    manifest_path = out_dir / MANIFEST
    old = _read_pack_manifest(manifest_path) if manifest_path.is_file() else None
    if old is not None:
        if (old.get("status") == "complete" and old.get("fingerprint") == fingerprint
                and shards_present(out_dir, old)):
            log.info("pack: %s is complete; nothing to do", out_dir)
            return PackResult(out_dir, old, skipped=True)

    shards = []
    for i, recs in enumerate(plan_shards(records, max_shard_bytes)):
        shard_fp = _fingerprint([(r["path"], r["size"], r["mtime_ns"]) for r in recs], min_side)
        shards.append({"name": f"shard-{i:05d}", "fingerprint": shard_fp, "records": recs,
                       "out_dir": str(out_dir), "min_side": min_side})
    done = {s["name"]: rec for s in shards if (rec := _shard_done(out_dir, s))}
    todo = [s for s in shards if s["name"] not in done]
    planned = {s["name"] for s in shards}
    for stale in out_dir.glob("shard-*"):
        if stale.name.split(".")[0] not in planned:
            stale.unlink()

    if todo:
        results = (_run_ray_pack(todo, num_cpus_per_task, show_progress, mirror) if use_ray
                   else [pack_shard(s) for s in todo])
        if (rel := _in_mirror(mirror, out_dir)) is not None:
            mirror.pull(rel)  # the shards the tasks wrote on their nodes
        done.update({r["name"]: r for r in results})

    shard_records = [done[s["name"]] for s in shards]
    bad = [b for rec in shard_records for b in rec["bad"]]
    listed_entities = {r["entity"] for r in records}
    bad_keys = {(b["entity_id"], b["image_index"]) for b in bad}
    good_entities = {r["entity"] for r in records
                     if (r["entity_id"], r["image_index"]) not in bad_keys}
    manifest = {
        "status": "complete",
        "version": PACK_VERSION,
        "fingerprint": fingerprint,
        "dataset": kg.name,
        "image_root": kg.image_root,
        "entities": kg.num_entities,
        "entities_with_image_files": len(listed_entities),
        "entities_with_images": len(good_entities),
        "entities_without_images": kg.num_entities - len(good_entities),
        "images_listed": len(records),
        "images_packed": sum(r["rows"] for r in shard_records),
        "images_bad": len(bad),
        "bad_images": bad,
        "packed_bytes": sum(r["bytes"] for r in shard_records),
        "max_shard_bytes": max_shard_bytes,
        "min_side": min_side,
        "shards_reused": len(shards) - len(todo),
        "shards": [{k: r[k] for k in ("file", "rows", "bytes", "sha256")} for r in shard_records],
        "seconds": time.perf_counter() - start,
    }
    if manifest["images_packed"] + manifest["images_bad"] != manifest["images_listed"]:
        raise RuntimeError(
            f"pack accounting mismatch: {manifest['images_packed']} packed + "
            f"{manifest['images_bad']} bad != {manifest['images_listed']} listed"
        )
    fault_point("pack.manifest")
    write_json_atomic(manifest_path, manifest)
    return PackResult(out_dir, manifest, skipped=False)


def _run_ray_pack(todo: list[dict], num_cpus: float, show_progress: bool,
                  mirror: Any = None) -> list[dict]:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = show_progress and console.verbose()
    # A few blocks of several shards per CPU: shards pack in parallel, and a task packs many
    # (a Ray task per shard costs more than packing a small one).
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1) / max(num_cpus, 1e-3)))
    items = [{"shard": json.dumps(s)} for s in todo]
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 2 * cpus))
    ds = ds.map(lambda row: {"result": json.dumps(pack_shard(json.loads(row["shard"]), mirror))},
                num_cpus=num_cpus)
    progress = console.StageProgress("pack", len(todo), "shards", enabled=show_progress)
    results = []
    for row in ds.iter_rows():
        results.append(json.loads(row["result"]))
        progress.update(n=1, images=sum(r["rows"] for r in results))
    progress.close()
    return results


def read_manifest(shard_dir: str | Path) -> dict:
    """The manifest of a complete pack output; a clear error when there is none."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no image shards at {shard_dir} (missing {MANIFEST}); run `elmm-ray pack` first"
        )
    manifest = read_json_checked(path, REPACK_HINT)
    if manifest.get("status") != "complete":
        raise RuntimeError(f"the pack output at {shard_dir} is incomplete; re-run `elmm-ray pack`")
    return manifest

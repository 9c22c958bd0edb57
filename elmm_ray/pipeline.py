"""The stages as functions of a :class:`Config`; the CLI and ``jobs/`` call these.

Each stage reads and writes the run directory and records a manifest, so that a
complete stage is skipped on re-run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from elmm_ray.config import Config
from elmm_ray.data.kg import KnowledgeGraph, load_kg
from elmm_ray.rundir import RunDir

log = logging.getLogger(__name__)


def dataset_dir(cfg: Config) -> Path:
    """The dataset folder: ``dataset.path``, or ``<run_dir>/data`` for the synthetic set."""
    if cfg.dataset.path:
        return Path(cfg.dataset.path).expanduser().resolve()
    return RunDir(cfg.run_dir).path("data")


def shard_dir(cfg: Config) -> Path:
    if cfg.images.shard_dir:
        return Path(cfg.images.shard_dir).expanduser().resolve()
    return RunDir(cfg.run_dir).path("shards")


def run_synth(cfg: Config):
    """Generate the synthetic dataset when the config names it (skipped when present)."""
    from elmm_ray.data.synth import synth_from_config

    if cfg.dataset.name != "synthetic":
        return None
    report = synth_from_config(cfg.dataset.synth, dataset_dir(cfg))
    RunDir(cfg.run_dir).write_manifest("synth", {
        "status": "complete", "out_dir": str(report.out_dir), "entities": report.num_entities,
        "relations": report.num_relations, "triples": report.triples,
        "images_written": report.images_written, "faults": len(report.faults),
    })
    return report


def load_dataset(cfg: Config) -> KnowledgeGraph:
    path = dataset_dir(cfg)
    return load_kg(path, format=cfg.dataset.format, image_root=cfg.dataset.image_root or None,
                   use_long_text=cfg.dataset.use_long_text,
                   name=None if cfg.dataset.name == "synthetic" else cfg.dataset.name)


def run_pack(cfg: Config, kg: KnowledgeGraph | None = None, show_progress: bool = True):
    """Pack the dataset's images into Parquet shards (Ray Data)."""
    from elmm_ray.data.shards import pack_images
    from elmm_ray.ray_session import init_ray

    kg = kg or load_dataset(cfg)
    init_ray(cfg.ray)
    result = pack_images(kg, shard_dir(cfg), max_shard_bytes=cfg.images.max_shard_bytes,
                         min_side=cfg.images.min_side,
                         num_cpus_per_task=cfg.images.num_cpus_per_task,
                         show_progress=show_progress)
    m = result.manifest
    RunDir(cfg.run_dir).write_manifest("pack", {
        "status": "complete", "fingerprint": m["fingerprint"], "shard_dir": str(result.out_dir),
        "images_packed": m["images_packed"], "images_bad": m["images_bad"],
        "skipped_rerun": result.skipped,
    })
    return result

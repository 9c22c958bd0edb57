"""Data stages: ``synth`` (the synthetic multimodal KG) and ``pack`` (image shards)."""

from __future__ import annotations

from elmm_ray.config import Config
from elmm_ray.data.shards import pack_complete, pack_images
from elmm_ray.data.synth import MANIFEST_NAME as SYNTH_MANIFEST
from elmm_ray.data.synth import synth_from_config
from elmm_ray.layout import RunLayout
from elmm_ray.ray_session import init_ray
from elmm_ray.stages.base import Stage, StageContext, data_stages, register


def run_synth(ctx: StageContext) -> dict:
    report = synth_from_config(ctx.cfg.dataset.synth, ctx.layout.dataset_dir)
    return {"out_dir": str(report.out_dir), "entities": report.num_entities,
            "relations": report.num_relations, "triples": report.triples,
            "images_written": report.images_written, "faults": len(report.faults)}


def run_pack(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    init_ray(cfg.ray)
    result = pack_images(ctx.kg, ctx.layout.shard_dir, max_shard_bytes=cfg.images.max_shard_bytes,
                         min_side=cfg.images.min_side,
                         num_cpus_per_task=cfg.images.num_cpus_per_task,
                         show_progress=ctx.show_progress, mirror=ctx.layout.remote)
    m = result.manifest
    return {"shard_dir": str(result.out_dir), "pack_fingerprint": m["fingerprint"],
            "images_packed": m["images_packed"], "images_bad": m["images_bad"],
            "summary_rows": result.summary_rows(), "bad_images": m["bad_images"][:20],
            "bad_images_total": len(m["bad_images"])}


def _synth_done(layout: RunLayout, cfg: Config) -> bool:
    return (layout.dataset_dir / SYNTH_MANIFEST).is_file()


def _pack_done(layout: RunLayout, cfg: Config) -> bool:
    """A readable, complete pack manifest whose shards are all there (a shard moved aside
    as corrupt makes the stage run again: it re-packs that shard)."""
    return pack_complete(layout.shard_dir)


SYNTH = register(Stage(
    name="synth", reads=("dataset.name", "dataset.synth"), needs=lambda cfg: (),
    describe=lambda m: (f"{m['entities']:,} entities, {sum(m['triples'].values()):,} triples, "
             f"{m['images_written']:,} images"),
    run=run_synth, outputs_exist=_synth_done,
    artifacts=("data",)))

PACK = register(Stage(
    name="pack",
    reads=("dataset.path", "dataset.format", "dataset.image_root", "dataset.synth",
           "images.shard_dir", "images.max_shard_bytes", "images.min_side"),
    needs=data_stages, run=run_pack,
    describe=lambda m: f"{m['images_packed']:,} images packed, {m['images_bad']:,} bad",
    outputs_exist=_pack_done,
    artifacts=("shards",)))

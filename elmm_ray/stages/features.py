"""Feature stages: ``extract`` (the frozen vision tower over every packed image, or the
configured precomputed embeddings, into the feature store) and ``entity_init`` (every
entity's own encoding by the untrained, seeded model: the initial entity table), both on
Ray Data actor pools."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from elmm_ray import console
from elmm_ray.config import Config, config_from_dict, config_to_dict
from elmm_ray.data.embeddings import embeddings_to_store
from elmm_ray.data.extraction import extract_features
from elmm_ray.data.feature_store import MANIFEST as STORE_MANIFEST
from elmm_ray.data.feature_store import METADATA as STORE_METADATA
from elmm_ray.data.feature_store import (
    FeatureStore,
    StoreLocation,
    expected_metadata,
    read_json_or_none,
)
from elmm_ray.faults import fault_point
from elmm_ray.integrity import sha256_file
from elmm_ray.layout import RunLayout
from elmm_ray.ray_session import init_ray
from elmm_ray.stages.base import Stage, StageContext, data_stages, image_stage, register
from elmm_ray.train.context import (
    backbone_source,
    build_context,
    get_tokenizer,
    prepare_backbone,
)

log = logging.getLogger(__name__)


def run_extract(ctx: StageContext) -> dict:
    cfg, layout = ctx.cfg, ctx.layout
    if cfg.dataset.visual_embeddings.path:
        return _store_from_embeddings(ctx)
    source = backbone_source(cfg, ctx.kg, layout)
    layout.push()  # a remote run directory: the backbone, for actors on other nodes
    init_ray(cfg.ray)
    prepare_backbone(cfg)  # a hub checkpoint: fetched once a node before the actors start
    result = extract_features(
        layout.shard_dir, layout.feature_store, backbone=source,
        max_images=cfg.images.max_images_per_entity, layer=cfg.model.vision_feature_layer,
        pool=cfg.model.feature_pool, dtype=cfg.model.dtype, actors=cfg.ray.data_actors,
        actor_cpus=cfg.ray.data_actor_cpus, actor_gpus=cfg.ray.data_actor_gpus,
        batch_size=cfg.ray.data_batch_size, decode_cpus=cfg.images.num_cpus_per_task,
        part_rows=cfg.ray.data_part_rows, show_progress=ctx.show_progress,
        mirror=layout.remote)
    m = result.manifest
    return {"store": result.store_dir, "store_fingerprint": m["fingerprint"],
            "backbone": m["backbone"], "counts": m["counts"], "parts": m["parts"],
            "images_this_run": m["images_this_run"], "store_reused": result.skipped,
            "skipped_images": m["skipped_images"], "failed_images": m["failed_images"],
            "summary_rows": result.summary_rows()}


def _store_from_embeddings(ctx: StageContext) -> dict:
    """The feature store from precomputed per-entity embeddings: no images, no Ray."""
    emb, layout = ctx.cfg.dataset.visual_embeddings, ctx.layout
    m = embeddings_to_store(emb.path, layout.feature_store, ctx.kg.entities, key=emb.key,
                            ids=emb.ids, axis=emb.axis,
                            max_images=ctx.cfg.images.max_images_per_entity)
    c = m["counts"]
    rows = [("embedding file", m["embeddings_file"]), ("rows in the file", f"{c['rows']:,}"),
            ("  rows naming no entity of the dataset", f"{c['rows_unmatched']:,}"),
            ("  all-zero rows (no embedding)", f"{c['zero_rows']:,}"),
            ("  slots beyond images.max_images_per_entity", f"{c['slots_beyond_max_images']:,}"),
            ("entities with embeddings", f"{c['entities_with_embeddings']:,}"),
            ("entities without embeddings (zeros + mask)",
             f"{c['entities_without_embeddings']:,}"),
            ("feature shape per slot", f"{m['tokens']} x {m['width']} fp16"),
            ("slots per entity", f"{m['slots']}"), ("parts", f"{m['parts']:,}")]
    return {"store": m["store"], "store_fingerprint": m["fingerprint"], "source": "embeddings",
            "counts": c, "parts": m["parts"], "summary_rows": rows}


def _describe_extract(m: dict) -> str:
    c = m["counts"]
    if m.get("source") == "embeddings":
        return (f"{c['entities_with_embeddings']:,} entities with precomputed embeddings, "
                f"{c['entities_without_embeddings']:,} without")
    return (f"{c['done']:,} images in the store ({m['images_this_run']:,} this run), "
            f"{c['skipped']:,} skipped, {c['failed']:,} failed")


def extract_needs(cfg: Config) -> tuple[str, ...]:
    """Image shards, or with precomputed embeddings only the dataset (its entity names)."""
    return data_stages(cfg) if cfg.dataset.visual_embeddings.path else ("pack",)


def _extract_done(layout: RunLayout, cfg: Config) -> bool:
    """The store's manifest is there and readable (a reader that finds a corrupt part
    removes it, so the stage runs again and re-extracts that part); a store made from
    precomputed embeddings also still matches the file's bytes (a file replaced at the same
    path changes no config value: its sha256 does)."""
    loc = StoreLocation(layout.feature_store)
    manifest = read_json_or_none(loc, STORE_MANIFEST)
    if not (manifest and manifest.get("status") == "complete"):
        return False
    embeddings = cfg.dataset.visual_embeddings.path
    if embeddings:
        recorded = (read_json_or_none(loc, STORE_METADATA) or {}).get("embeddings_sha256")
        if recorded != sha256_file(embeddings):
            log.warning("extract: %s changed since the feature store was built from it "
                        "(sha256 differs): rebuilding the store", embeddings)
            return False
    return True


class _EntityEncoder:
    """Builds the (untrained, seeded) ELMM once and encodes batches of entity ids."""

    def __init__(self, config: dict, kg: Any, store: str | None, expect: dict | None,
                 use_gpu: bool, threads: int) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if threads > 0:
            torch.set_num_threads(threads)
        cfg = config_from_dict(config)
        RunLayout.of(cfg).pull_inputs()  # a remote run directory: tokenizer, backbone here
        features = FeatureStore.open(store, expect=expect) if store else None
        ctx = build_context(cfg, kg, features=features)
        self.features = ctx.features
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = ctx.model.to(self.device).eval()
        self.collator = ctx.collator

    def __call__(self, batch: dict) -> dict:
        ids = torch.from_numpy(np.array(batch["id"], dtype=np.int64))
        feats, mask = self.features.features_for(ids)
        inputs = self.collator.entity_batch(ids, feats, mask)
        with torch.no_grad():
            vectors = self.model.encode_entities(
                {k: v.to(self.device) for k, v in inputs.items()})
        return {"entity": ids.numpy(), "vector": vectors.float().cpu().numpy()}


def encode_entities_ray(cfg: Config, kg: Any, *, store: str | None, expect: dict | None,
                        actor_threads: int = 0, show_progress: bool = True) -> torch.Tensor:
    """Every entity's own encoding ``(E, embed_dim)`` float32, rows in entity-id order,
    computed by a Ray Data actor pool (each actor builds the model once)."""
    import ray

    num = kg.num_entities
    batch_size = cfg.ray.data_batch_size
    blocks = max(1, min(-(-num // batch_size), 64))
    ds = ray.data.range(num, override_num_blocks=blocks)
    ds.context.enable_progress_bars = show_progress and console.verbose()
    ds = ds.map_batches(
        _EntityEncoder, batch_size=batch_size, batch_format="numpy",
        fn_constructor_kwargs={
            "config": config_to_dict(cfg), "kg": kg, "store": store, "expect": expect,
            "use_gpu": cfg.ray.data_actor_gpus > 0, "threads": actor_threads},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.ray.data_actors),
        num_cpus=cfg.ray.data_actor_cpus, num_gpus=cfg.ray.data_actor_gpus)
    table: torch.Tensor | None = None
    seen = np.zeros(num, dtype=np.int64)
    progress = console.StageProgress("entity_init", num, "entities", enabled=show_progress)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        entity = np.array(batch["entity"], dtype=np.int64)
        vectors = torch.from_numpy(np.array(batch["vector"], dtype=np.float32))
        if table is None:
            table = torch.zeros(num, vectors.shape[1], dtype=torch.float32)
        table[torch.from_numpy(entity)] = vectors
        np.add.at(seen, entity, 1)
        progress.update(n=len(entity))
    progress.close()
    if table is None or not (seen == 1).all():
        raise RuntimeError(f"entity encoding: {int((seen == 0).sum())} entities missing, "
                           f"{int((seen > 1).sum())} encoded more than once")
    return table


def run_entity_init(ctx: StageContext) -> dict:
    cfg, layout, kg = ctx.cfg, ctx.layout, ctx.kg
    # Tokenizer and backbone are written (or fetched) once here, before any actor looks.
    prepare_backbone(cfg)
    get_tokenizer(cfg, kg, layout)
    source = backbone_source(cfg, kg, layout)
    store = expect = None
    if "extract" in image_stage(cfg):
        store, expect = layout.feature_store, expected_metadata(cfg, source)
        FeatureStore.open(store, expect=expect)  # refuse a mismatching store before Ray
    layout.push()  # a remote run directory: tokenizer and backbone, for the actors
    init_ray(cfg.ray)
    prepare_backbone(cfg)  # and on every other node of the cluster
    table = encode_entities_ray(cfg, kg, store=store, expect=expect,
                                show_progress=ctx.show_progress)
    out = layout.entity_init
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({"entity_table": table.contiguous()}, str(tmp))
    fault_point("entity_init.save")
    os.replace(tmp, out)
    return {"path": str(out), "entities": int(table.shape[0]), "embed_dim": int(table.shape[1]),
            "store": store}


EXTRACT = register(Stage(
    name="extract",
    reads=("seed", "model", "images.max_images_per_entity", "images.feature_store",
           "dataset.path", "dataset.format", "dataset.visual_embeddings"),
    # what the language side does with the features does not change them
    exclude=("model.temperature", "model.uncompressed", "model.entity_repr",
             "model.entity_image_adapter", "model.max_text_tokens"),
    needs=extract_needs, run=run_extract, outputs_exist=_extract_done,
    describe=_describe_extract,
    artifacts=("features",)))

ENTITY_INIT = register(Stage(
    name="entity_init",
    reads=("seed", "dataset", "model", "mvtc", "lora", "train.seed",
           "images.max_images_per_entity"),
    needs=image_stage, run=run_entity_init,
    describe=lambda m: f"{m['entities']:,} entities x {m['embed_dim']}",
    outputs_exist=lambda layout, cfg: layout.entity_init.is_file(),
    artifacts=("entity_init.safetensors", "tokenizer", "backbone")))

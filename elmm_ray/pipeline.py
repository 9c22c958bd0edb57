"""The stages as functions of a :class:`Config`; the CLI and ``jobs/`` call these.

Each stage reads and writes the run directory and records a manifest, so that a
complete stage is skipped on re-run.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from elmm_ray.config import Config
from elmm_ray.data.kg import KnowledgeGraph, load_kg
from elmm_ray.rundir import RunDir, read_json

log = logging.getLogger(__name__)


def _absolute(path: str) -> str:
    if not path or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def absolute_paths(cfg: Config) -> Config:
    """The config with every local path made absolute (relative to this process's working
    directory), so that Ray workers, whose working directory differs, see the same files."""
    return dataclasses.replace(
        cfg, run_dir=_absolute(cfg.run_dir),
        dataset=dataclasses.replace(cfg.dataset, path=_absolute(cfg.dataset.path),
                                    image_root=_absolute(cfg.dataset.image_root)),
        images=dataclasses.replace(cfg.images, shard_dir=_absolute(cfg.images.shard_dir),
                                   feature_store=_absolute(cfg.images.feature_store)),
    )


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
                   use_long_text=cfg.dataset.use_long_text, name=cfg.dataset.name)


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


def trained_model_dir(cfg: Config) -> Path:
    return RunDir(cfg.run_dir).path("train", "model")


def run_train(cfg: Config, kg: KnowledgeGraph | None = None, show_progress: bool = True) -> dict:
    """Train with the configured backend; returns the training summary (with test metrics)."""
    kg = kg or load_dataset(cfg)
    rd = RunDir(cfg.run_dir)
    rd.write_config(cfg)
    if cfg.train.backend == "ray":
        from elmm_ray.train.trainer import train_ray

        summary = train_ray(cfg, kg)
        summary["metrics"] = run_eval(cfg, kg)
    else:
        from elmm_ray.train.local import train_local

        summary = train_local(cfg, kg, shard_dir(cfg), show_progress=show_progress)
    rd.write_manifest("train", {"status": "complete", "backend": cfg.train.backend,
                                "steps": summary["steps"],
                                "train_seconds": summary["train_seconds"],
                                "model_dir": str(trained_model_dir(cfg))})
    write_metrics(cfg, summary["metrics"])
    return summary


def write_metrics(cfg: Config, metrics: dict) -> Path:
    from elmm_ray.eval.report import write_metrics_json

    path = RunDir(cfg.run_dir).path("eval", f"metrics_{metrics['split']}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_metrics_json(metrics, path)
    return path


def run_eval(cfg: Config, kg: KnowledgeGraph | None = None) -> dict:
    """Filtered ranking of the trained model of the run directory on ``eval.split``."""
    from elmm_ray.eval.evaluate import evaluate_model

    kg = kg or load_dataset(cfg)
    ctx = load_trained_context(cfg, kg)
    metrics = evaluate_model(ctx.model, ctx.collator, ctx.features, kg, split=cfg.eval.split,
                             batch_size=cfg.eval.batch_size, max_queries=cfg.eval.max_queries,
                             ks=cfg.eval.hits_at)
    write_metrics(cfg, metrics)
    return metrics


def run_extract(cfg: Config, kg: KnowledgeGraph | None = None, show_progress: bool = True):
    """Extract the packed images' visual features into the feature store (Ray Data)."""
    from elmm_ray.data.features import default_store_dir, extract_features
    from elmm_ray.ray_session import init_ray
    from elmm_ray.train.context import backbone_source

    kg = kg or load_dataset(cfg)
    run_dir = RunDir(cfg.run_dir)
    source = backbone_source(cfg, kg, run_dir)
    init_ray(cfg.ray)
    result = extract_features(
        shard_dir(cfg), default_store_dir(cfg), backbone=source,
        max_images=cfg.images.max_images_per_entity, layer=cfg.model.vision_feature_layer,
        pool=cfg.model.feature_pool, dtype=cfg.model.dtype, actors=cfg.ray.data_actors,
        actor_cpus=cfg.ray.data_actor_cpus, actor_gpus=cfg.ray.data_actor_gpus,
        batch_size=cfg.ray.data_batch_size, decode_cpus=cfg.images.num_cpus_per_task,
        show_progress=show_progress)
    m = result.manifest
    run_dir.write_manifest("extract", {
        "status": "complete", "fingerprint": m["fingerprint"], "store": result.store_dir,
        "backbone": m["backbone"], "counts": m["counts"], "parts": m["parts"],
        "images_this_run": m["images_this_run"], "skipped_rerun": result.skipped,
        "seconds": m["seconds"], "skipped_images": m["skipped_images"],
        "failed_images": m["failed_images"],
    })
    return result


def run_entity_init(cfg: Config, kg: KnowledgeGraph | None = None,
                    show_progress: bool = True) -> dict:
    """The initial entity table (each entity's text + MVTC tokens through the untrained,
    seeded model, on a Ray Data actor pool) -> ``<run_dir>/entity_init.safetensors``."""
    import hashlib
    import json
    import os
    import time

    from safetensors.torch import save_file

    from elmm_ray.config import config_to_dict
    from elmm_ray.data.features import (
        FeatureStore,
        default_store_dir,
        encode_entities_ray,
        expected_metadata,
    )
    from elmm_ray.ray_session import init_ray
    from elmm_ray.train.context import backbone_source, get_tokenizer

    kg = kg or load_dataset(cfg)
    run_dir = RunDir(cfg.run_dir)
    # Tokenizer and backbone are written once here, before any actor looks for them.
    get_tokenizer(cfg, kg, run_dir)
    source = backbone_source(cfg, kg, run_dir)
    store = default_store_dir(cfg)
    expect = expected_metadata(cfg, source)
    store_fingerprint = FeatureStore.open(store, expect=expect).metadata["fingerprint"]
    sections = config_to_dict(cfg)
    key = {k: sections[k] for k in ("seed", "dataset", "model", "mvtc", "lora")}
    key.update(train_seed=cfg.train.seed, store=store_fingerprint)
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    out = run_dir.path("entity_init.safetensors")
    if out.is_file() and run_dir.is_complete("entity_init", fingerprint):
        log.info("entity init: %s is complete; nothing to do", out)
        return {**run_dir.read_manifest("entity_init"), "skipped_rerun": True}
    init_ray(cfg.ray)
    start = time.perf_counter()
    table = encode_entities_ray(cfg, kg, run_dir=str(run_dir.root), shard_dir=str(shard_dir(cfg)),
                                store=store, expect=expect, show_progress=show_progress)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({"entity_table": table.contiguous()}, str(tmp))
    os.replace(tmp, out)
    manifest = {"status": "complete", "fingerprint": fingerprint, "path": str(out),
                "entities": int(table.shape[0]), "embed_dim": int(table.shape[1]),
                "store": store, "seconds": time.perf_counter() - start}
    run_dir.write_manifest("entity_init", manifest)
    return {**manifest, "stage": "entity_init", "skipped_rerun": False}


def load_trained_context(cfg: Config, kg: KnowledgeGraph):
    """The run's model with its trained weights (LoRA not merged) and features."""
    from elmm_ray.models.lora import load_trainable
    from elmm_ray.train.context import build_context

    model_dir = trained_model_dir(cfg)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"no trained model at {model_dir}; run `elmm-ray train` first")
    ctx = build_context(cfg, kg, RunDir(cfg.run_dir), shard_dir(cfg))
    load_trainable(ctx.model, model_dir)
    return ctx


def final_context(cfg: Config, kg: KnowledgeGraph):
    """The run's final model: the pruned one when the prune stage ran, else the trained one."""
    from elmm_ray.pruning.run import STAGE, load_pruned_context

    pruned = RunDir(cfg.run_dir).path(STAGE, "model")
    if cfg.prune.method != "none" and pruned.is_dir():
        return load_pruned_context(cfg, kg, shard_dir(cfg))
    return load_trained_context(cfg, kg)


def export_dir(cfg: Config) -> Path:
    return RunDir(cfg.run_dir).path("export")


def run_export(cfg: Config, kg: KnowledgeGraph | None = None, out_dir: str | None = None) -> Path:
    """Write the trained model of the run as a self-contained model directory."""
    from elmm_ray.export import export_model

    kg = kg or load_dataset(cfg)
    ctx = final_context(cfg, kg)
    out = export_model(ctx.model, ctx.tokenizer, ctx.features, kg, cfg,
                       out_dir or export_dir(cfg))
    RunDir(cfg.run_dir).write_manifest("export", {"status": "complete", "out_dir": str(out)})
    return out


def eval_export(model_dir: str | Path, split: str = "", max_queries: int | None = None) -> dict:
    """Filtered ranking of an exported model on its dataset."""
    from elmm_ray.eval.evaluate import evaluate_model
    from elmm_ray.export import load_export

    exported = load_export(model_dir)
    cfg = exported.config
    kg = load_dataset(cfg)
    if kg.entities != exported.entities:
        raise ValueError(f"the dataset at {dataset_dir(cfg)} does not have the entities of the "
                         f"export {model_dir}")
    return evaluate_model(exported.model, exported.collator, exported.features, kg,
                          split=split or cfg.eval.split, batch_size=cfg.eval.batch_size,
                          max_queries=cfg.eval.max_queries if max_queries is None
                          else max_queries, ks=cfg.eval.hits_at)


def train_fingerprint(cfg: Config) -> str:
    """What a trained model depends on: data, images, model, adapters, training, seed."""
    from elmm_ray.config import config_hash

    parts = {name: getattr(cfg, name) for name in
             ("dataset", "images", "model", "mvtc", "lora", "train", "deepspeed")}
    parts["train"] = dataclasses.replace(cfg.train, fail_at_step=None, max_failures=0)
    return config_hash({"seed": cfg.seed, "run_dir": str(Path(cfg.run_dir).resolve()),
                        **{k: dataclasses.asdict(v) for k, v in parts.items()}})


def run_all(cfg: Config, show_progress: bool = True) -> dict:
    """The main job: synth -> pack -> extract -> entity init -> train -> eval
    (-> prune + fine-tune when ``prune.method`` is set) -> export, in one run directory;
    complete stages are skipped, an interrupted training resumes."""
    import time

    rd = RunDir(cfg.run_dir)
    rd.write_config(cfg)
    timings: dict[str, float] = {}

    def timed(stage: str, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        timings[stage] = time.perf_counter() - start
        return out

    timed("synth", run_synth, cfg)
    kg = load_dataset(cfg)
    timed("pack", run_pack, cfg, kg, show_progress=show_progress)
    timed("extract", run_extract, cfg, kg, show_progress=show_progress)
    timed("entity_init", run_entity_init, cfg, kg, show_progress=show_progress)
    fingerprint = train_fingerprint(cfg)
    trained = rd.is_complete("train", fingerprint)
    if not trained:
        summary = timed("train", run_train, cfg, kg, show_progress=show_progress)
        manifest = rd.read_manifest("train") or {}
        rd.write_manifest("train", {**manifest, "fingerprint": fingerprint})
        metrics = summary["metrics"]
    else:
        timings["train"] = 0.0
        metrics = read_json(rd.path("eval", f"metrics_{cfg.eval.split}.json"))
    if cfg.prune.method != "none":
        from elmm_ray.pruning.run import run_prune

        timed("prune", run_prune, cfg, kg, show_progress=show_progress)
        pruned = rd.read_manifest("prune")
        fingerprint = f"{fingerprint}-prune-{pruned['fingerprint']}"
        metrics = {"overall": pruned["post_ft"], "unpruned": metrics["overall"]}
    export_manifest = rd.read_manifest("export") or {}
    if trained and export_manifest.get("fingerprint") == fingerprint:
        out = Path(export_manifest["out_dir"])
        timings["export"] = 0.0
    else:
        out = timed("export", run_export, cfg, kg)
        rd.write_manifest("export", {"status": "complete", "out_dir": str(out),
                                     "fingerprint": fingerprint})
    train_manifest = rd.read_manifest("train") or {}
    meta = read_json(out / "elmm_export.json")
    return {"dataset": kg.name, "parameters": meta["parameters"], "metrics": metrics,
            "export_dir": str(out), "skipped_training": trained, "timings": timings,
            "train_seconds": train_manifest.get("train_seconds", 0.0)}

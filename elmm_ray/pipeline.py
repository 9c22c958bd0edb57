"""The main job: the stages of :mod:`elmm_ray.stages` chained in one run directory.

``synth -> pack -> extract -> entity_init -> train -> eval (-> prune) -> export``; each
stage is skipped when complete with the same fingerprint, an interrupted training resumes.
"""

from __future__ import annotations

from elmm_ray.config import Config
from elmm_ray.stages import plan, run_stages
from elmm_ray.stages.base import data_stages, image_stage


def pipeline_stages(cfg: Config) -> list[str]:
    """The stages ``elmm-ray run`` chains for ``cfg``."""
    images = ["extract"] if "extract" in image_stage(cfg) else []
    pack = [] if cfg.dataset.visual_embeddings.path else ["pack"]  # no images to pack
    stages = [*data_stages(cfg), *pack, *images]
    if "entity_init" in plan("train", cfg):  # Ray Train workers read the initial table
        stages.append("entity_init")
    stages += ["train", "eval"]
    if cfg.prune.method != "none":
        stages.append("prune")
    stages.append("export")
    return stages


def run_all(cfg: Config, show_progress: bool = True) -> dict:
    """Run the pipeline; returns the results table's figures and the time of each stage."""
    results = run_stages(pipeline_stages(cfg), cfg, show_progress=show_progress)
    train, evaluated = results["train"].manifest, results["eval"].manifest
    metrics = {d: evaluated[d] for d in ("overall", "tail", "head") if d in evaluated}
    if "prune" in results:
        pruned = results["prune"].manifest
        metrics = {"overall": pruned["post_ft"], "unpruned": evaluated["overall"]}
    export = results["export"].manifest
    return {"dataset": cfg.dataset.name, "parameters": export["parameters"], "metrics": metrics,
            "export_dir": export["out_dir"], "skipped_training": results["train"].skipped,
            "pruned": "prune" in results,
            "timings": {name: r.seconds for name, r in results.items()},
            "train_seconds": train.get("train_seconds", 0.0)}

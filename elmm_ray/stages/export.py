"""``export``: the run's final model (pruned when the prune stage ran, else trained) as a
self-contained model directory (:mod:`elmm_ray.export`)."""

from __future__ import annotations

from pathlib import Path

from elmm_ray.config import Config
from elmm_ray.data.dataset import load_dataset
from elmm_ray.eval.evaluate import evaluate_model
from elmm_ray.export import MARKER, export_model, load_export
from elmm_ray.layout import RunLayout, read_json
from elmm_ray.stages.base import Stage, StageContext, register
from elmm_ray.tracking import open_tracker
from elmm_ray.train.context import final_context


def export_run(cfg: Config, kg, out_dir: str | Path | None = None) -> Path:
    """Write the run's final model to ``out_dir`` (default ``<run_dir>/export``)."""
    ctx = final_context(cfg, kg)
    return export_model(ctx.model, ctx.tokenizer, ctx.collator, ctx.features, kg, cfg,
                        out_dir or RunLayout.of(cfg).export_dir)


def run_export(ctx: StageContext) -> dict:
    out = export_run(ctx.cfg, ctx.kg)
    meta = read_json(out / MARKER)
    with open_tracker(ctx.cfg) as tracker:
        tracker.log_artifact(out / MARKER, "export")
    return {"out_dir": str(out), "parameters": meta["parameters"]}


def export_needs(cfg: Config) -> tuple[str, ...]:
    return ("train", "prune") if cfg.prune.method != "none" else ("train",)


def eval_export(model_dir: str | Path, split: str = "", max_queries: int | None = None) -> dict:
    """Filtered ranking of an exported model on its dataset."""
    exported = load_export(model_dir)
    cfg = exported.config
    kg = load_dataset(cfg)
    if kg.entities != exported.entities:
        raise ValueError(f"the dataset at {RunLayout.of(cfg).dataset_dir} does not have the "
                         f"entities of the export {model_dir}")
    return evaluate_model(exported.model, exported.collator, exported.features, kg,
                          split=split or cfg.eval.split, batch_size=cfg.eval.batch_size,
                          max_queries=cfg.eval.max_queries if max_queries is None
                          else max_queries, ks=cfg.eval.hits_at)


EXPORT = register(Stage(
    name="export", reads=("eval",), needs=export_needs, run=run_export,
    outputs_exist=lambda layout, cfg: (layout.export_dir / MARKER).is_file()))

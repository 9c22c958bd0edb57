"""``export``: the run's final model (pruned when the prune stage ran, else trained) at
``export.checkpoint`` (``best`` or ``last``) as a self-contained model directory with a
PEFT adapter and a model card (:mod:`elmm_ray.export`)."""

from __future__ import annotations

from pathlib import Path

import torch

from elmm_ray.config import Config, config_from_dict, config_to_dict
from elmm_ray.data.dataset import load_dataset
from elmm_ray.eval.evaluate import evaluate_model
from elmm_ray.export import MARKER, export_model, load_export
from elmm_ray.integrity import intact
from elmm_ray.layout import RunLayout, read_json
from elmm_ray.models.build import forbid_model_build
from elmm_ray.ray_session import init_ray
from elmm_ray.stages.base import RUN_ONLY_KEYS, Stage, StageContext, register
from elmm_ray.stages.train import evaluate
from elmm_ray.tracking import open_tracker
from elmm_ray.train.context import final_checkpoint, final_context


def export_run(cfg: Config, kg, out_dir: str | Path | None = None,
               checkpoint: str | None = None, device: str | None = None) -> Path:
    """Write the run's final model at ``checkpoint`` (default ``export.checkpoint``) to
    ``out_dir`` (default ``<run_dir>/export``). The card's metrics are the eval stage's
    when they measured these very weights (the last ones of an unpruned run), else the
    exported weights are evaluated here with the ``eval`` settings."""
    chosen = final_checkpoint(cfg, checkpoint or cfg.export.checkpoint)
    ctx = final_context(cfg, kg, chosen["checkpoint"])
    if device:  # the merge, the card's evaluation and the final entity encoding run there
        ctx.model.to(device)
    measured = RunLayout.of(cfg).metrics_file(cfg.eval.split)
    if chosen["checkpoint"] == "last" and not chosen["pruned"] and measured.is_file():
        metrics = read_json(measured)
    else:
        metrics = evaluate(cfg, kg, ctx)
    return export_model(ctx.model, ctx.tokenizer, ctx.collator, ctx.features, kg, cfg,
                        out_dir or RunLayout.of(cfg).export_dir, metrics=metrics,
                        checkpoint=chosen)


def _export_task(config: dict, out_dir: str | None) -> str:
    cfg = config_from_dict(config)
    torch.set_num_threads(cfg.train.threads_per_worker)
    device = "cuda" if cfg.train.use_gpu and torch.cuda.is_available() else None
    layout = RunLayout.of(cfg)
    layout.pull_inputs()  # a remote run directory: this node's mirror gets the model
    out = export_run(cfg, load_dataset(cfg), out_dir, device=device)
    if out_dir is None:
        layout.push("export")  # for the driver, whatever node it is on
    return str(out)


def export_on_ray(cfg: Config, out_dir: str | Path | None = None) -> Path:
    """:func:`export_run` on a Ray worker with a training worker's resources (CPUs, a GPU
    with ``train.use_gpu``): the merge of a 7B model needs the memory of a GPU node, not
    of the head the driver runs on. The run directory must be reachable from the worker."""
    import ray

    init_ray(cfg.ray)
    task = ray.remote(_export_task).options(
        num_cpus=cfg.train.cpus_per_worker, num_gpus=1 if cfg.train.use_gpu else 0,
        max_retries=1)
    out = Path(ray.get(task.remote(config_to_dict(cfg),
                                   str(Path(out_dir).resolve()) if out_dir else None)))
    if out_dir is None:  # in the run directory: here, whatever node the task ran on
        layout = RunLayout.of(cfg)
        layout.pull("export")
        return layout.export_dir
    return out


def run_export(ctx: StageContext) -> dict:
    if ctx.cfg.train.backend == "ray":
        with forbid_model_build("export runs on a Ray worker (train.backend=ray)"):
            out = export_on_ray(ctx.cfg)
    else:
        out = export_run(ctx.cfg, ctx.kg)
    meta = read_json(out / MARKER)
    with open_tracker(ctx.cfg) as tracker:
        tracker.log_artifact(out / MARKER, "export")
    record = (meta["checkpoint"] or {}).get("record") or {}
    return {"out_dir": str(out), "location": ctx.layout.display(out),
            "parameters": meta["parameters"],
            "checkpoint": ctx.cfg.export.checkpoint, "checkpoint_step": record.get("step"),
            "checkpoint_val_mrr": record.get("val_mrr"),
            "adapter": meta["adapter"] is not None}


def export_needs(cfg: Config) -> tuple[str, ...]:
    """The trained (and, when configured, pruned) model, and the eval stage's metrics of
    the trained one (the card's figures for an unpruned run's last weights)."""
    return ("eval", "prune") if cfg.prune.method != "none" else ("eval",)


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
    name="export", reads=("eval", "export"), exclude=RUN_ONLY_KEYS, needs=export_needs,
    run=run_export,
    describe=lambda m: m.get("location", m["out_dir"]),
    outputs_exist=lambda layout, cfg: ((layout.export_dir / MARKER).is_file()
                                       and intact(layout.export_dir))))

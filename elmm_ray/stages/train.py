"""``train`` (the one training loop, local or on Ray Train) and ``eval`` (filtered ranking
of the trained model on ``eval.split``)."""

from __future__ import annotations

from elmm_ray.config import Config
from elmm_ray.eval.evaluate import evaluate_model
from elmm_ray.eval.report import write_metrics_json
from elmm_ray.layout import RunLayout
from elmm_ray.stages.base import Stage, StageContext, register
from elmm_ray.train.context import ModelContext, load_trained_context
from elmm_ray.train.trainer import train


def evaluate(cfg: Config, kg, ctx: ModelContext, split: str | None = None) -> dict:
    """Filtered ranking of ``ctx.model`` with the ``eval`` settings of ``cfg``."""
    return evaluate_model(ctx.model, ctx.collator, ctx.features, kg,
                          split=split or cfg.eval.split, batch_size=cfg.eval.batch_size,
                          max_queries=cfg.eval.max_queries, ks=cfg.eval.hits_at)


def write_metrics(cfg: Config, metrics: dict):
    path = RunLayout.of(cfg).metrics_file(metrics["split"])
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_metrics_json(metrics, path)


def run_train(ctx: StageContext) -> dict:
    summary = train(ctx.cfg, ctx.kg, show_progress=ctx.show_progress,
                    tune_trial=ctx.tune_trial)
    history = summary["history"]
    return {"backend": ctx.cfg.train.backend, "steps": summary["steps"],
            "train_seconds": summary["train_seconds"],
            "model_dir": str(ctx.layout.trained_model),
            "best_val_mrr": max((h["val_mrr"] for h in history), default=None)}


def _trained(layout: RunLayout, cfg: Config) -> bool:
    return (layout.trained_model / "trainable.json").is_file()


def train_needs(cfg: Config) -> tuple[str, ...]:
    """Ray Train workers read the entity-init table and the feature store; the local
    backend computes what is missing in its own process, so it needs only the shards."""
    if cfg.train.backend == "ray":
        return ("entity_init",)
    return ("pack",)


def run_eval(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    model = load_trained_context(cfg, ctx.kg)
    metrics = evaluate(cfg, ctx.kg, model)
    path = write_metrics(cfg, metrics)
    return {"split": metrics["split"], "metrics_file": str(path),
            "overall": metrics["overall"], "num_queries": metrics["num_queries"]}


TRAIN = register(Stage(
    name="train",
    reads=("seed", "dataset", "images", "model", "mvtc", "lora", "train", "deepspeed"),
    exclude=("train.fail_at_step", "train.max_failures", "images.num_cpus_per_task"),
    needs=train_needs, run=run_train, outputs_exist=_trained,
    help="train (train.backend=ray: Ray Train + DeepSpeed; local: one process)",
    artifacts=("train", "tokenizer", "backbone")))

EVAL = register(Stage(
    name="eval", reads=("eval",), needs=lambda cfg: ("train",), run=run_eval,
    outputs_exist=lambda layout, cfg: layout.metrics_file(cfg.eval.split).is_file(),
    help="filtered ranking of the trained model on eval.split"))

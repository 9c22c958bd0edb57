"""``train`` (the one training loop, local or on Ray Train) and ``eval`` (filtered ranking
of the trained model on ``eval.split``)."""

from __future__ import annotations

from elmm_ray.config import Config
from elmm_ray.eval.evaluate import evaluate_model
from elmm_ray.eval.report import write_metrics_json
from elmm_ray.faults import fault_point
from elmm_ray.integrity import intact
from elmm_ray.layout import RunLayout
from elmm_ray.models.build import forbid_model_build
from elmm_ray.stages.base import RUN_ONLY_KEYS, Stage, StageContext, image_stage, register
from elmm_ray.tracking import open_tracker
from elmm_ray.train.context import ModelContext, load_trained_context
from elmm_ray.train.loop import LoopSpec
from elmm_ray.train.ray_eval import eval_workers, evaluate_on_ray
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
    # The Ray Train run is named by the fingerprint: the same command resumes it; a changed
    # key starts a new run instead of resuming the old config's checkpoint.
    spec = LoopSpec(run_name=f"train-{ctx.fingerprint}")
    summary = train(ctx.cfg, ctx.kg, spec, show_progress=ctx.show_progress,
                    tune_trial=ctx.tune_trial)
    history = summary["history"]
    payload = {"backend": ctx.cfg.train.backend, "steps": summary["steps"],
               "train_seconds": summary["train_seconds"],
               "model_dir": str(ctx.layout.trained_model),
               "best_val_mrr": max((h["val_mrr"] for h in history), default=None)}
    if summary.get("startup"):  # Ray Train: where the fit's time outside the loop went
        payload["startup_seconds"] = summary["startup"]
    return payload


def _trained(layout: RunLayout, cfg: Config) -> bool:
    """The final weights are there, and they and the best round's match their recorded
    sizes (a file moved aside as corrupt makes the stage run again)."""
    return ((layout.trained_model / "trainable.json").is_file()
            and intact(layout.trained_model) and intact(layout.best_model))


def train_needs(cfg: Config) -> tuple[str, ...]:
    """Ray Train workers read the entity-init table (unless entity vectors are encodings
    alone) and the feature store; the local backend computes both in its own process, so it
    needs only the shards."""
    if cfg.train.backend == "local":  # precomputed embeddings: the store is the only source
        return image_stage(cfg) if cfg.dataset.visual_embeddings.path else ("pack",)
    return image_stage(cfg) if cfg.model.entity_repr == "encoder" else ("entity_init",)


def run_eval(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    if eval_workers(cfg):  # the model is built and run on Ray workers only
        with forbid_model_build("eval runs on Ray workers (eval.workers > 0)"):
            metrics = evaluate_on_ray(cfg, ctx.kg)
    else:
        metrics = evaluate(cfg, ctx.kg, load_trained_context(cfg, ctx.kg))
    fault_point("eval.metrics")
    path = write_metrics(cfg, metrics)
    with open_tracker(cfg) as tracker:
        tracker.log_metrics(metrics, f"eval/{metrics['split']}")
        tracker.log_artifact(path, "eval")
    return {"split": metrics["split"], "metrics_file": str(path),
            "overall": metrics["overall"], "num_queries": metrics["num_queries"],
            **{d: metrics[d] for d in ("tail", "head") if d in metrics}}


TRAIN = register(Stage(
    name="train",
    reads=("seed", "dataset", "images", "model", "mvtc", "lora", "train", "deepspeed"),
    exclude=RUN_ONLY_KEYS,
    needs=train_needs, run=run_train, outputs_exist=_trained,
    describe=lambda m: (f"{m['steps']:,} steps ({m['train_seconds']:.1f} s of training), "
                        f"best val MRR {m['best_val_mrr'] or 0:.4f}"),
    artifacts=("train", "tokenizer", "backbone")))

EVAL = register(Stage(
    name="eval", reads=("eval",), exclude=RUN_ONLY_KEYS, needs=lambda cfg: ("train",),
    run=run_eval,
    describe=lambda m: (f"{m['split']} MRR {m['overall']['mrr']:.4f} over "
                        f"{m['num_queries']:,} queries"),
    outputs_exist=lambda layout, cfg: layout.metrics_file(cfg.eval.split).is_file()))

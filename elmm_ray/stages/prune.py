"""The ``prune`` stage: the only place where pruning meets the :class:`Config`.

``run_prune``: load the trained run (``<run_dir>/train/model``), merge LoRA, prune
with ``prune.method`` to ``prune.ratio`` in ``prune.steps`` rounds (attention pruning:
one round), fine-tuning ``prune.finetune_steps`` steps after each round through the one
training loop (:mod:`elmm_ray.train.loop`, on the configured backend) with
``L_task + prune.knowledge_weight * L_knowledge`` (fresh LoRA adapters when
``lora.enabled``; compensation maps train too), evaluate, save the pruned model to
``<run_dir>/prune/model`` (``backbone/`` = pruned backbone, plus the trainable tensors)
and write ``prune_report.{md,json,png}`` into ``<run_dir>/prune``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time

from elmm_ray.config import Config
from elmm_ray.data.kg import KnowledgeGraph
from elmm_ray.faults import fault_point
from elmm_ray.integrity import intact
from elmm_ray.layout import RunLayout
from elmm_ray.models.elmm import ELMM
from elmm_ray.models.lora import load_trainable, merge_lora
from elmm_ray.models.pruned import save_pruned_model
from elmm_ray.pruning import make_pruner
from elmm_ray.pruning.base import CalibrationData, PruneOptions, sample_queries
from elmm_ray.pruning.report import (
    compare_latency,
    count_parameters,
    overall_metrics,
    paired_speedup,
    parameter_mb,
    peak_forward_memory_mb,
    summarise,
    timing_batches,
    write_report,
)
from elmm_ray.pruning.structured import original_prunable_parameters, prunable_parameters
from elmm_ray.stages.base import RUN_ONLY_KEYS, Stage, StageContext, register
from elmm_ray.stages.train import evaluate
from elmm_ray.tracking import open_tracker
from elmm_ray.train.context import (
    ModelContext,
    load_trained_context,
    prepare_finetune,
)
from elmm_ray.train.loop import LoopSpec
from elmm_ray.train.trainer import train

log = logging.getLogger(__name__)

STAGE = "prune"
LATENCY_BATCH = 32
LATENCY_BATCHES = 4
LATENCY_REPEATS = 7


# --- config -> plain arguments ----------------------------------------------------------------


def prune_options(cfg: Config) -> PruneOptions:
    """The pruners' options from ``cfg.prune``."""
    p = cfg.prune
    return PruneOptions(threshold=p.threshold, importance=p.importance, scope=p.scope,
                        min_heads_per_layer=p.min_heads_per_layer,
                        min_neurons_per_layer=p.min_neurons_per_layer,
                        compensation_rank=p.compensation_rank or 0, ridge=p.ridge, seed=p.seed)


def calibration_data(cfg: Config, kg: KnowledgeGraph, ctx: ModelContext,
                     holdout: bool = True) -> CalibrationData:
    """``prune.calib_samples`` seeded training queries (+ as many held-out training queries
    for the attention errors), training-known answers as L_knowledge targets."""
    count = cfg.prune.calib_samples
    queries = sample_queries(kg.queries("train"), 2 * count if holdout else count,
                             cfg.prune.seed)
    return CalibrationData(ctx.collator, ctx.features, queries[:count],
                           kg.filter_index(("train",)), batch_size=16,
                           holdout=queries[count:] if holdout else None)


def finetune_config(cfg: Config) -> Config:
    """``cfg`` with the fine-tuning settings of ``prune``: ``max_steps = finetune_steps``,
    ``learning_rate = prune.finetune_lr``, ``knowledge_weight = prune.knowledge_weight``,
    warm-up capped at 10% of the steps."""
    steps = cfg.prune.finetune_steps
    train = dataclasses.replace(cfg.train, max_steps=max(steps, 1),  # finetune_steps=0: unused
                                learning_rate=cfg.prune.finetune_lr,
                                epochs=max(cfg.train.epochs, steps),
                                knowledge_weight=cfg.prune.knowledge_weight,
                                warmup_steps=min(cfg.train.warmup_steps, steps // 10),
                                seed=cfg.train.seed + cfg.prune.seed)
    return dataclasses.replace(cfg, train=train)


def deployment_copy(model: ELMM) -> ELMM:
    """A copy with LoRA merged (what would be deployed), for timing and counting."""
    clone = copy.deepcopy(model)
    merge_lora(clone)
    return clone.eval()


# --- the schedule -----------------------------------------------------------------------------


def prune_schedule(cfg: Config, kg: KnowledgeGraph, ctx: ModelContext,
                   data: CalibrationData, *, out_prefix: str = STAGE,
                   show_progress: bool = False, tune_trial: bool = False,
                   run_tag: str = "") -> dict:
    """Prune ``ctx.model`` in place with ``cfg.prune`` (method, ratio, steps), fine-tuning
    after every round. Returns the rounds with metrics right after pruning (``pre_ft``)
    and after fine-tuning (``post_ft``) of the last round."""
    p = cfg.prune
    pruner = make_pruner(p.method, prune_options(cfg))
    steps = 1 if p.method == "attention" else p.steps
    ft_cfg = finetune_config(cfg)
    rounds = []
    for k in range(1, steps + 1):
        merge_lora(ctx.model)
        amount = p.ratio if p.method == "attention" else p.ratio * k / steps
        start = time.perf_counter()
        report = pruner.prune(ctx.model, data, amount)
        record: dict = {"round": k, "amount": amount, "prune_seconds":
                        time.perf_counter() - start, "report": report}
        record["pre_ft"] = overall_metrics(evaluate(cfg, kg, ctx))
        if p.finetune_steps > 0:
            summary = finetune(ft_cfg, kg, ctx, f"{out_prefix}/finetune_{k}", show_progress,
                               tune_trial, run_tag)
            record["post_ft"] = overall_metrics(evaluate(cfg, kg, ctx))
            # Per-step losses from the local loop; the Ray loop reports window means.
            losses = summary.get("losses") or [h["loss"] for h in summary["history"]]
            record["finetune"] = {"steps": summary["steps"],
                                  "seconds": summary["train_seconds"],
                                  "first_loss": losses[0] if losses else None,
                                  "last_loss": losses[-1] if losses else None}
        else:
            record["post_ft"] = record["pre_ft"]
        log.info("prune round %d/%d (%s %.3f): pre-FT %s post-FT %s", k, steps, p.method,
                 amount, record["pre_ft"], record["post_ft"])
        rounds.append(record)
        fault_point("prune.round")
    return {"method": p.method, "ratio": p.ratio, "steps": steps, "rounds": rounds,
            "pre_ft": rounds[-1]["pre_ft"], "post_ft": rounds[-1]["post_ft"],
            "removed_share": 1 - prunable_parameters(ctx.model)
            / original_prunable_parameters(ctx.model)}


def finetune(cfg: Config, kg: KnowledgeGraph, ctx: ModelContext, out_subdir: str,
             show_progress: bool, tune_trial: bool = False, run_tag: str = "") -> dict:
    """Fine-tune the pruned (merged) ``ctx.model`` through the one training loop, keeping its
    entity table: in this process (``train.backend=local``), or on Ray Train workers, which
    load the pruned model saved under ``<out_subdir>/start`` and whose result is loaded
    back into ``ctx.model``."""
    if cfg.train.backend == "local":
        prepare_finetune(ctx.model, cfg)
        return train(cfg, kg, LoopSpec(out_subdir=out_subdir), ctx, show_progress=show_progress,
                     tune_trial=tune_trial, stage="prune")
    layout = RunLayout.of(cfg)
    start = save_pruned_model(ctx.model, layout.path(out_subdir, "start"))
    spec = LoopSpec(out_subdir=out_subdir, init_model=str(start),
                    run_name=out_subdir.replace("/", "_") + (f"-{run_tag}" if run_tag else ""))
    summary = train(cfg, kg, spec, show_progress=show_progress, tune_trial=tune_trial,
                    stage="prune")
    prepare_finetune(ctx.model, cfg)
    load_trainable(ctx.model, layout.path(out_subdir, "model"))
    return summary


def measure(models: dict[str, ELMM], batches: list, repeats: int = LATENCY_REPEATS,
            base: str | None = None) -> dict[str, dict]:
    """Parameters, latency, speedup vs ``models[base]`` and forward peak activation memory
    of each model as deployed (LoRA merged), the models timed in turns.

    ``latency_ms``/``speedup``: median CPU time and its ratio on CPU (robust on a shared
    machine), median wall time on GPU; ``speedup_wall``: ratio of the best wall times;
    ``speedup_paired``: median of the paired wall-time ratios."""
    deployed = {name: deployment_copy(m) for name, m in models.items()}
    latency = compare_latency(deployed, batches, repeats=repeats)
    on_cpu = all(next(m.parameters()).device.type == "cpu" for m in deployed.values())
    key = "cpu_ms" if on_cpu else "median_ms"
    out = {}
    for name, model in deployed.items():
        params = count_parameters(model)
        timing = latency[name]
        out[name] = {"llm_params": params["llm"], "total_params": params["total"],
                     "latency_ms": timing[key], "latency_clock": "cpu" if on_cpu else "wall",
                     "wall_min_ms": timing["min_ms"], "wall_median_ms": timing["median_ms"],
                     "cpu_ms": timing["cpu_ms"], "wall_runs_ms": timing["runs_ms"],
                     "cpu_runs_ms": timing["cpu_runs_ms"], "param_mb": parameter_mb(model),
                     "peak_mem_mb": peak_forward_memory_mb(model, batches[0])}
        speed = {"speedup": 1.0, "speedup_wall": 1.0, "speedup_paired": 1.0}
        if base:
            ref = latency[base]
            speed = {"speedup": ref[key] / timing[key],
                     "speedup_wall": ref["min_ms"] / timing["min_ms"],
                     "speedup_paired": paired_speedup(ref["runs_ms"], timing["runs_ms"])}
        out[name] |= speed
    return out


def run_prune(stage: StageContext) -> dict:
    """The ``prune`` stage (see the module docstring): returns the manifest payload."""
    cfg, kg = stage.cfg, stage.kg
    if cfg.prune.method == "none":
        raise ValueError("prune.method is 'none': set prune.method to attention, knowledge, "
                         "magnitude or random")
    out = stage.layout.stage_dir(STAGE)
    start = time.perf_counter()
    ctx = load_trained_context(cfg, kg)
    merge_lora(ctx.model)
    ctx.model.eval()
    base_metrics = overall_metrics(evaluate(cfg, kg, ctx))
    batches = timing_batches(ctx.collator, ctx.features,
                             sample_queries(kg.queries(cfg.eval.split), 10**9, 0),
                             LATENCY_BATCH, LATENCY_BATCHES)
    unpruned = deployment_copy(ctx.model)  # kept for interleaved timing
    data = calibration_data(cfg, kg, ctx)
    schedule = prune_schedule(cfg, kg, ctx, data, out_prefix=STAGE,
                              show_progress=stage.show_progress, tune_trial=stage.tune_trial,
                              run_tag=stage.fingerprint)
    measured = measure({"unpruned": unpruned, "pruned": ctx.model}, batches, base="unpruned")
    base, pruned = measured["unpruned"], measured["pruned"]
    del unpruned
    rows = [
        {"method": "none", "ratio": 0.0, "seed": cfg.prune.seed, **base,
         "pre_ft": base_metrics, "post_ft": base_metrics, "retained_hits1": 1.0,
         "removed_share": 0.0},
        {"method": cfg.prune.method, "ratio": cfg.prune.ratio, "seed": cfg.prune.seed, **pruned,
         "pre_ft": schedule["pre_ft"], "post_ft": schedule["post_ft"],
         "removed_share": schedule["removed_share"],
         "retained_hits1": _retained(schedule["post_ft"], base_metrics)},
    ]
    attention = []
    if cfg.prune.method == "attention":
        report = schedule["rounds"][0]["report"]
        rows[1]["label"] = f"{len(report['pruned_layers'])} layers"
        attention.append({"label": rows[1]["label"], "layers": report["layers"]})
    payload = {
        "settings": {"method": cfg.prune.method, "ratio": cfg.prune.ratio,
                     "steps": schedule["steps"], "importance": cfg.prune.importance,
                     "scope": cfg.prune.scope, "finetune_steps": cfg.prune.finetune_steps,
                     "knowledge_weight": cfg.prune.knowledge_weight,
                     "calib_samples": cfg.prune.calib_samples, "split": cfg.eval.split},
        "rows": summarise(rows), "runs": rows, "rounds": schedule["rounds"],
        "attention": attention,
        "notes": [f"latency: {LATENCY_REPEATS} passes over {LATENCY_BATCHES} batches of "
                  f"{LATENCY_BATCH} queries (LoRA merged), pruned and unpruned timed in turns; "
                  "Latency/Speedup: median CPU time on CPU (median wall time on GPU), Wall "
                  "speedup: ratio of the best wall times; peak activation memory from the "
                  "PyTorch profiler",
                  "Hits@1 (pruned) is right after the last pruning round, (+FT) after its "
                  "fine-tuning; retained = Hits@1 (+FT) / unpruned Hits@1"],
    }
    model_dir = save_pruned_model(ctx.model, stage.layout.pruned_model,
                                  extra={"method": cfg.prune.method, "ratio": cfg.prune.ratio})
    paths = write_report(out, payload, title=f"Pruning: {cfg.prune.method} {cfg.prune.ratio}")
    with open_tracker(cfg) as tracker:
        tracker.log_metrics({"unpruned": base_metrics, "pre_ft": schedule["pre_ft"],
                             "post_ft": schedule["post_ft"], "speedup": pruned["speedup"],
                             "removed_share": schedule["removed_share"]}, STAGE)
        tracker.log_artifacts(paths.values(), STAGE)
    return {"model_dir": str(model_dir), "report": str(paths["md"]),
            "method": cfg.prune.method, "ratio": cfg.prune.ratio,
            "prune_seconds": time.perf_counter() - start, "pre_ft": schedule["pre_ft"],
            "post_ft": schedule["post_ft"], "unpruned": base_metrics,
            "speedup": pruned["speedup"]}


def _retained(metrics: dict, base: dict) -> float | None:
    hits, base_hits = metrics.get("hits@1"), base.get("hits@1")
    if hits is None or not base_hits:
        return None
    return float(hits / base_hits)


PRUNE = register(Stage(
    name=STAGE, reads=("prune", "eval", "train", "lora"), exclude=RUN_ONLY_KEYS,
    needs=lambda cfg: ("train",), run=run_prune,
    describe=lambda m: f"{m['method']} {m['ratio']:g}: report {m['report']}",
    outputs_exist=lambda layout, cfg: ((layout.stage_dir(STAGE) / "prune_report.json").is_file()
                                       and layout.pruned_model.is_dir()
                                       and intact(layout.pruned_model))))

"""The ``prune`` stage: the only place where pruning meets the :class:`Config`.

``run_prune``: load the trained run (``<run_dir>/train/model``), merge LoRA, prune
with ``prune.method`` to ``prune.ratio`` in ``prune.steps`` rounds (attention pruning:
one round), fine-tuning ``prune.finetune_steps`` steps after each round through the one
training loop (:mod:`elmm_ray.train.loop`, on the configured backend) with
``L_task + prune.knowledge_weight * L_knowledge`` (fresh LoRA adapters when
``lora.enabled``; compensation maps train too), evaluate, save the pruned model to
``<run_dir>/prune/model`` (``backbone/`` = pruned backbone, plus the trainable tensors)
and write ``prune_report.{md,json,png}`` into ``<run_dir>/prune``. With
``train.backend=ray`` the driver only orchestrates (:func:`prune_on_ray`): every step that
builds the model runs on a Ray worker.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path

import torch

from elmm_ray.config import Config, config_from_dict, config_to_dict
from elmm_ray.data.dataset import load_dataset
from elmm_ray.data.kg import KnowledgeGraph
from elmm_ray.faults import fault_point
from elmm_ray.integrity import intact
from elmm_ray.layout import RunLayout
from elmm_ray.models.build import forbid_model_build
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
from elmm_ray.ray_session import init_ray
from elmm_ray.stages.base import RUN_ONLY_KEYS, Stage, StageContext, register
from elmm_ray.stages.train import evaluate
from elmm_ray.tracking import open_tracker
from elmm_ray.train.context import (
    ModelContext,
    load_pruned_context,
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
                        compensation_rank=p.compensation_rank or 0,
                        compensation=p.compensation, ridge=p.ridge, seed=p.seed)


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


def round_count(cfg: Config) -> int:
    """Pruning rounds of ``cfg.prune`` (attention pruning: one)."""
    return 1 if cfg.prune.method == "attention" else cfg.prune.steps


def prune_round(cfg: Config, kg: KnowledgeGraph, ctx: ModelContext, data: CalibrationData,
                k: int) -> dict:
    """Round ``k``: merge the adapters, prune ``ctx.model`` in place to the round's share,
    evaluate (``pre_ft``). Seeded: the same round of the same model gives the same units."""
    p = cfg.prune
    merge_lora(ctx.model)
    amount = p.ratio if p.method == "attention" else p.ratio * k / round_count(cfg)
    start = time.perf_counter()
    report = make_pruner(p.method, prune_options(cfg)).prune(ctx.model, data, amount)
    record: dict = {"round": k, "amount": amount, "prune_seconds":
                    time.perf_counter() - start, "report": report}
    record["pre_ft"] = overall_metrics(evaluate(cfg, kg, ctx))
    return record


def finetune_record(summary: dict) -> dict:
    # Per-step losses from the local loop; the Ray loop reports window means.
    losses = summary.get("losses") or [h["loss"] for h in summary["history"]]
    return {"steps": summary["steps"], "seconds": summary["train_seconds"],
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None}


def schedule_result(cfg: Config, ctx: ModelContext, rounds: list[dict]) -> dict:
    return {"method": cfg.prune.method, "ratio": cfg.prune.ratio, "steps": round_count(cfg),
            "rounds": rounds, "pre_ft": rounds[-1]["pre_ft"], "post_ft": rounds[-1]["post_ft"],
            "removed_share": 1 - prunable_parameters(ctx.model)
            / original_prunable_parameters(ctx.model)}


def prune_schedule(cfg: Config, kg: KnowledgeGraph, ctx: ModelContext,
                   data: CalibrationData, *, out_prefix: str = STAGE,
                   show_progress: bool = False, tune_trial: bool = False,
                   run_tag: str = "") -> dict:
    """Prune ``ctx.model`` in place with ``cfg.prune`` (method, ratio, steps), fine-tuning
    after every round. Returns the rounds with metrics right after pruning (``pre_ft``)
    and after fine-tuning (``post_ft``) of the last round."""
    p = cfg.prune
    ft_cfg = finetune_config(cfg)
    rounds = []
    for k in range(1, round_count(cfg) + 1):
        record = prune_round(cfg, kg, ctx, data, k)
        if p.finetune_steps > 0:
            summary = finetune(ft_cfg, kg, ctx, f"{out_prefix}/finetune_{k}", show_progress,
                               tune_trial, run_tag)
            record["post_ft"] = overall_metrics(evaluate(cfg, kg, ctx))
            record["finetune"] = finetune_record(summary)
        else:
            record["post_ft"] = record["pre_ft"]
        log.info("prune round %d/%d (%s %.3f): pre-FT %s post-FT %s", k, round_count(cfg),
                 p.method, record["amount"], record["pre_ft"], record["post_ft"])
        rounds.append(record)
        fault_point("prune.round")
    return schedule_result(cfg, ctx, rounds)


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
    save_pruned_model(ctx.model, layout.path(out_subdir, "start"))
    summary = finetune_on_ray(cfg, kg, out_subdir, show_progress, tune_trial, run_tag)
    prepare_finetune(ctx.model, cfg)
    load_trainable(ctx.model, layout.path(out_subdir, "model"))
    return summary


def finetune_on_ray(cfg: Config, kg: KnowledgeGraph, out_subdir: str, show_progress: bool,
                    tune_trial: bool = False, run_tag: str = "") -> dict:
    """Ray Train fine-tuning of the pruned model saved under ``<out_subdir>/start``; rank 0
    writes the result to ``<out_subdir>/model``."""
    spec = LoopSpec(out_subdir=out_subdir, init_model=str(RunLayout.of(cfg).path(
        out_subdir, "start")), run_name=out_subdir.replace("/", "_") + (
        f"-{run_tag}" if run_tag else ""))
    return train(cfg, kg, spec, show_progress=show_progress, tune_trial=tune_trial,
                 stage="prune")


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


def start_prune(cfg: Config, kg: KnowledgeGraph) -> tuple[ModelContext, dict]:
    """The trained model with LoRA merged, and its metrics (``eval`` settings)."""
    ctx = load_trained_context(cfg, kg)
    merge_lora(ctx.model)
    ctx.model.eval()
    return ctx, overall_metrics(evaluate(cfg, kg, ctx))


def timing_inputs(cfg: Config, kg: KnowledgeGraph, ctx: ModelContext) -> list:
    return timing_batches(ctx.collator, ctx.features,
                          sample_queries(kg.queries(cfg.eval.split), 10**9, 0),
                          LATENCY_BATCH, LATENCY_BATCHES)


def run_prune(stage: StageContext) -> dict:
    """The ``prune`` stage (see the module docstring): returns the manifest payload. On Ray
    (``train.backend=ray``) every step that builds the model runs on a Ray worker
    (:func:`prune_on_ray`); here, in this process."""
    cfg, kg = stage.cfg, stage.kg
    if cfg.prune.method == "none":
        raise ValueError("prune.method is 'none': set prune.method to attention, knowledge, "
                         "magnitude or random")
    if cfg.train.backend == "ray":
        result = prune_on_ray(stage)
    else:
        start = time.time()
        ctx, base_metrics = start_prune(cfg, kg)
        batches = timing_inputs(cfg, kg, ctx)
        unpruned = deployment_copy(ctx.model)  # kept for interleaved timing
        data = calibration_data(cfg, kg, ctx)
        schedule = prune_schedule(cfg, kg, ctx, data, out_prefix=STAGE,
                                  show_progress=stage.show_progress,
                                  tune_trial=stage.tune_trial, run_tag=stage.fingerprint)
        result = finish_prune(cfg, ctx, unpruned, batches, base_metrics, schedule, start)
    with open_tracker(cfg) as tracker:
        tracker.log_metrics(result.pop("tracked"), STAGE)
        tracker.log_artifacts(result.pop("artifacts"), STAGE)
    return result


def finish_prune(cfg: Config, ctx: ModelContext, unpruned: ELMM, batches: list,
                 base_metrics: dict, schedule: dict, start: float) -> dict:
    """Time the pruned model against ``unpruned``, save it to ``<run_dir>/prune/model`` and
    write the report: returns the manifest payload plus ``tracked`` (metrics) and
    ``artifacts`` (report files) for the tracker."""
    layout = RunLayout.of(cfg)
    measured = measure({"unpruned": unpruned, "pruned": ctx.model}, batches, base="unpruned")
    base, pruned = measured["unpruned"], measured["pruned"]
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
    model_dir = save_pruned_model(ctx.model, layout.pruned_model,
                                  extra={"method": cfg.prune.method, "ratio": cfg.prune.ratio})
    paths = write_report(layout.stage_dir(STAGE), payload,
                         title=f"Pruning: {cfg.prune.method} {cfg.prune.ratio}")
    return {"model_dir": str(model_dir), "report": str(paths["md"]),
            "method": cfg.prune.method, "ratio": cfg.prune.ratio,
            "prune_seconds": time.time() - start, "pre_ft": schedule["pre_ft"],
            "post_ft": schedule["post_ft"], "unpruned": base_metrics,
            "speedup": pruned["speedup"],
            "tracked": {"unpruned": base_metrics, "pre_ft": schedule["pre_ft"],
                        "post_ft": schedule["post_ft"], "speedup": pruned["speedup"],
                        "removed_share": schedule["removed_share"]},
            "artifacts": [str(path) for path in paths.values()]}


# --- on Ray: the driver only orchestrates ------------------------------------------------------
# Every step that needs the model runs in a Ray task with a training worker's resources (a
# GPU with train.use_gpu), one task per round boundary, the state between them in the run
# directory (pushed and pulled when it is on object storage):
# task 1: load the trained model, merge LoRA, evaluate it, prune round 1 (importance pass on
#   the calibration queries), evaluate, save prune/finetune_1/start;
# the driver: fine-tune round 1 on Ray Train workers through the one training loop (they load
#   start, rank 0 writes prune/finetune_1/model);
# task k+1: load start + the fine-tuned weights, evaluate (round k's post_ft), then prune
#   round k+1 ...; the last task times the pruned model against the unpruned one, saves
#   prune/model and writes the report.
# The schedule, seeds and saved files are those of prune_schedule: both give the same model.


def _start_dir(k: int) -> str:
    return f"{STAGE}/finetune_{k}/start"


def _prune_task(config: dict, k: int, rounds: list[dict], base: dict | None,
                start: float) -> dict:
    """Round boundary ``k`` (1-based) on a worker: round ``k-1``'s ``post_ft`` (``k > 1``),
    then prune round ``k``, or, past the last round, time, save and report. ``base``: the
    unpruned model's metrics (measured by task 1)."""
    cfg = config_from_dict(config)
    torch.set_num_threads(cfg.train.threads_per_worker)
    layout = RunLayout.of(cfg)
    layout.pull_inputs()  # a remote run directory: this node's mirror gets the models
    kg = load_dataset(cfg)
    out: dict = {}
    if k == 1:
        ctx, base = start_prune(cfg, kg)
        out["base"] = base
    else:
        ctx = load_pruned_context(cfg, kg, layout.path(_start_dir(k - 1)))
        if cfg.prune.finetune_steps > 0:
            ft_cfg = finetune_config(cfg)
            prepare_finetune(ctx.model, ft_cfg)
            load_trainable(ctx.model, layout.path(f"{STAGE}/finetune_{k - 1}", "model"))
            rounds[-1]["post_ft"] = overall_metrics(evaluate(cfg, kg, ctx))
        else:
            rounds[-1]["post_ft"] = rounds[-1]["pre_ft"]
    if k <= round_count(cfg):
        record = prune_round(cfg, kg, ctx, calibration_data(cfg, kg, ctx), k)
        save_pruned_model(ctx.model, layout.path(_start_dir(k)))
        layout.push(f"{STAGE}/finetune_{k}")
        return {**out, "record": record, "rounds": rounds}
    trained = load_trained_context(cfg, kg)  # the unpruned model, for the timing
    merge_lora(trained.model)
    result = finish_prune(cfg, ctx, deployment_copy(trained.model),
                          timing_inputs(cfg, kg, trained), base, schedule_result(cfg, ctx, rounds),
                          start)
    layout.push(STAGE)
    return {**out, "result": result, "rounds": rounds, "root": str(layout.root)}


def prune_on_ray(stage: StageContext) -> dict:
    """The prune stage with every model step on a Ray worker (see the module docstring);
    returns what :func:`elmm_ray.stages.prune.finish_prune` returns."""
    import ray

    cfg: Config = stage.cfg
    init_ray(cfg.ray)
    task = ray.remote(_prune_task).options(
        num_cpus=cfg.train.cpus_per_worker, num_gpus=1 if cfg.train.use_gpu else 0,
        max_retries=1, runtime_env={"env_vars": {"OMP_NUM_THREADS":
                                                 str(cfg.train.threads_per_worker)}})
    config, start = config_to_dict(cfg), time.time()
    layout = RunLayout.of(cfg)
    ft_cfg = finetune_config(cfg)
    rounds: list[dict] = []
    base = None
    with forbid_model_build("the prune stage runs its model steps on Ray workers "
                            "(train.backend=ray)"):
        for k in range(1, round_count(cfg) + 2):
            answer = ray.get(task.remote(config, k, rounds, base, start))
            rounds, base = answer["rounds"], answer.get("base", base)
            if "result" in answer:  # its paths are in the task node's mirror: here, ours
                layout.pull(STAGE)
                result, root = answer["result"], Path(answer["root"])
                for key in ("model_dir", "report"):
                    result[key] = str(layout.root / Path(result[key]).relative_to(root))
                result["artifacts"] = [str(layout.root / Path(a).relative_to(root))
                                       for a in result["artifacts"]]
                return result
            record = answer["record"]
            if cfg.prune.finetune_steps > 0:
                layout.pull(f"{STAGE}/finetune_{k}")
                summary = finetune_on_ray(ft_cfg, stage.kg, f"{STAGE}/finetune_{k}",
                                          stage.show_progress, stage.tune_trial,
                                          stage.fingerprint)
                record["finetune"] = finetune_record(summary)
            rounds.append(record)
            log.info("prune round %d/%d (%s %.3f) on Ray: pre-FT %s", k, round_count(cfg),
                     cfg.prune.method, record["amount"], record["pre_ft"])
            fault_point("prune.round")
    raise AssertionError("unreachable: the last task returns the result")


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

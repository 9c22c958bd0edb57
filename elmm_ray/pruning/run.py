"""The ``prune`` stage: the only pruning module that reads the :class:`Config`.

``run_prune(cfg)``: load the trained run (``<run_dir>/train/model``), merge LoRA, prune
with ``prune.method`` to ``prune.ratio`` in ``prune.steps`` rounds (attention pruning:
one round), fine-tuning ``prune.finetune_steps`` steps after each round with
``L_task + prune.knowledge_weight * L_knowledge`` (fresh LoRA adapters when
``lora.enabled``; compensation maps train too), evaluate, save the pruned model to
``<run_dir>/prune/model`` (``backbone/`` = pruned backbone, plus the trainable tensors)
and write ``prune_report.{md,json,png}`` into ``<run_dir>/prune``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

from elmm_ray.config import Config
from elmm_ray.data.image_features import FeatureBank
from elmm_ray.data.kg import KnowledgeGraph
from elmm_ray.eval.evaluate import evaluate_model
from elmm_ray.models.build import build_elmm
from elmm_ray.models.elmm import ELMM
from elmm_ray.models.lora import (
    apply_lora,
    load_trainable,
    lora_layers,
    merge_lora,
    save_trainable,
    set_trainable,
)
from elmm_ray.pruning import make_pruner
from elmm_ray.pruning.base import CalibrationData, PruneOptions, sample_queries
from elmm_ray.pruning.compensation import LinearCompensation
from elmm_ray.pruning.io import load_pruned_weights, save_pruned_backbone
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
from elmm_ray.rundir import RunDir, read_json
from elmm_ray.train.context import (
    ModelContext,
    backbone_source,
    build_features,
    entity_texts,
    get_tokenizer,
)

log = logging.getLogger(__name__)

STAGE = "prune"
MODEL_SUBDIR = "model"
BACKBONE_SUBDIR = "backbone"
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


# --- model contexts ----------------------------------------------------------------------------


def load_pruned_context(cfg: Config, kg: KnowledgeGraph, shard_dir: Path,
                        model_dir: Path | None = None,
                        features: FeatureBank | None = None) -> ModelContext:
    """A pruned model saved by :func:`save_pruned_model` (default ``<run_dir>/prune/model``):
    the run's backbone reshaped and loaded from ``backbone/``, then ``load_trainable``."""
    from elmm_ray.data.collate import QueryCollator

    run_dir = RunDir(cfg.run_dir)
    model_dir = Path(model_dir) if model_dir else run_dir.path(STAGE, MODEL_SUBDIR)
    tokenizer = get_tokenizer(cfg, kg, run_dir)
    source = backbone_source(cfg, kg, run_dir)
    effective = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone=source))
    model = build_elmm(effective, num_entities=kg.num_entities, tokenizer=tokenizer)
    load_pruned_weights(model, model_dir / BACKBONE_SUBDIR)
    load_trainable(model, model_dir)
    collator = QueryCollator(tokenizer, entity_texts(kg), kg.relation_texts, kg.num_relations,
                             cfg.model.max_text_tokens)
    if features is None:
        features = build_features(cfg, model, kg, shard_dir)
    return ModelContext(model, tokenizer, collator, features)


def save_pruned_model(model: ELMM, directory: Path, extra: dict | None = None) -> Path:
    """Pruned backbone into ``directory/backbone``, trainable tensors into ``directory``."""
    directory = Path(directory)
    save_pruned_backbone(model, directory / BACKBONE_SUBDIR, extra)
    save_trainable(model, directory)
    return directory


def mark_compensation_trainable(model: ELMM) -> int:
    """Make every compensation map trainable; returns how many parameters that is."""
    count = 0
    for module in model.modules():
        if isinstance(module, LinearCompensation):
            for parameter in module.parameters():
                parameter.requires_grad_(True)
                count += parameter.numel()
    return count


def prepare_finetune(model: ELMM, cfg: Config) -> None:
    """Fresh LoRA adapters on the pruned LLM (or the whole LLM trains), plus the heads and
    compensation maps."""
    if lora_layers(model):
        raise ValueError("merge the previous adapters before adding new ones")
    if hasattr(model, "peft_config"):  # left behind by merged adapters
        del model.peft_config
    if cfg.lora.enabled:
        apply_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                   target_regex=cfg.lora.target_regex)
    else:
        set_trainable(model, train_llm=True)
    mark_compensation_trainable(model)


def deployment_copy(model: ELMM) -> ELMM:
    """A copy with LoRA merged (what would be deployed), for timing and counting."""
    clone = copy.deepcopy(model)
    merge_lora(clone)
    return clone.eval()


# --- the schedule -----------------------------------------------------------------------------


def evaluate(cfg: Config, kg: KnowledgeGraph, ctx: ModelContext) -> dict:
    return evaluate_model(ctx.model, ctx.collator, ctx.features, kg, split=cfg.eval.split,
                          batch_size=cfg.eval.batch_size, max_queries=cfg.eval.max_queries,
                          ks=cfg.eval.hits_at)


def prune_schedule(cfg: Config, kg: KnowledgeGraph, shard_dir: Path, ctx: ModelContext,
                   data: CalibrationData, *, out_prefix: str = STAGE,
                   show_progress: bool = False) -> dict:
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
            prepare_finetune(ctx.model, cfg)
            summary = train_local_quiet(ft_cfg, kg, shard_dir, ctx, f"{out_prefix}/finetune_{k}",
                                        show_progress)
            record["post_ft"] = overall_metrics(summary["metrics"])
            record["finetune"] = {"steps": summary["steps"],
                                  "seconds": summary["train_seconds"],
                                  "first_loss": summary["losses"][0] if summary["losses"] else None,
                                  "last_loss": summary["losses"][-1] if summary["losses"] else None}
        else:
            record["post_ft"] = record["pre_ft"]
        log.info("prune round %d/%d (%s %.3f): pre-FT %s post-FT %s", k, steps, p.method,
                 amount, record["pre_ft"], record["post_ft"])
        rounds.append(record)
    return {"method": p.method, "ratio": p.ratio, "steps": steps, "rounds": rounds,
            "pre_ft": rounds[-1]["pre_ft"], "post_ft": rounds[-1]["post_ft"],
            "removed_share": 1 - prunable_parameters(ctx.model)
            / original_prunable_parameters(ctx.model)}


def train_local_quiet(cfg: Config, kg: KnowledgeGraph, shard_dir: Path, ctx: ModelContext,
                      out_subdir: str, show_progress: bool) -> dict:
    """``train_local`` on an existing context, keeping its entity table."""
    from elmm_ray.train.local import train_local

    return train_local(cfg, kg, shard_dir, ctx=ctx, out_subdir=out_subdir, init_table=False,
                       show_progress=show_progress)


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


def fingerprint(cfg: Config, model_dir: Path) -> str:
    """Hash of the prune / fine-tune / eval settings and the trained checkpoint's manifest."""
    manifest = model_dir / "trainable.json"
    payload = {"prune": dataclasses.asdict(cfg.prune), "train": dataclasses.asdict(cfg.train),
               "lora": dataclasses.asdict(cfg.lora), "eval": dataclasses.asdict(cfg.eval),
               "trained": manifest.stat().st_mtime_ns if manifest.is_file() else None}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
        :20]


def run_prune(cfg: Config, kg: KnowledgeGraph | None = None, show_progress: bool = True) -> dict:
    """The ``prune`` stage (see the module docstring). Returns the report payload."""
    from elmm_ray import pipeline

    if cfg.prune.method == "none":
        raise ValueError("prune.method is 'none': set prune.method to attention, knowledge, "
                         "magnitude or random")
    run_dir = RunDir(cfg.run_dir)
    trained = run_dir.path("train", MODEL_SUBDIR)
    if not (trained / "trainable.json").is_file():
        raise FileNotFoundError(f"no trained model at {trained}: run the train stage first")
    out = run_dir.path(STAGE)
    digest = fingerprint(cfg, trained)
    if run_dir.is_complete(STAGE, digest) and (out / "prune_report.json").is_file():
        log.info("prune stage complete with the same settings; skipping")
        return read_json(out / "prune_report.json")
    kg = kg or pipeline.load_dataset(cfg)
    shard_dir = pipeline.shard_dir(cfg)
    start = time.perf_counter()
    ctx = pipeline.load_trained_context(cfg, kg)
    merge_lora(ctx.model)
    ctx.model.eval()
    base_metrics = overall_metrics(evaluate(cfg, kg, ctx))
    batches = timing_batches(ctx.collator, ctx.features,
                             sample_queries(kg.queries(cfg.eval.split), 10**9, 0),
                             LATENCY_BATCH, LATENCY_BATCHES)
    unpruned = deployment_copy(ctx.model)  # kept for interleaved timing
    data = calibration_data(cfg, kg, ctx)
    schedule = prune_schedule(cfg, kg, shard_dir, ctx, data, out_prefix=STAGE,
                              show_progress=show_progress)
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
    model_dir = save_pruned_model(ctx.model, out / MODEL_SUBDIR,
                                  extra={"method": cfg.prune.method, "ratio": cfg.prune.ratio})
    paths = write_report(out, payload, title=f"Pruning: {cfg.prune.method} {cfg.prune.ratio}")
    run_dir.write_manifest(STAGE, {
        "status": "complete", "fingerprint": digest, "model_dir": str(model_dir),
        "report": str(paths["md"]), "method": cfg.prune.method, "ratio": cfg.prune.ratio,
        "seconds": time.perf_counter() - start, "post_ft": schedule["post_ft"],
        "speedup": pruned["speedup"]})
    return payload


def _retained(metrics: dict, base: dict) -> float | None:
    hits, base_hits = metrics.get("hits@1"), base.get("hits@1")
    if hits is None or not base_hits:
        return None
    return float(hits / base_hits)

"""The single-process trainer (``train.backend=local``): no Ray, same model, loss, step
and evaluation as the distributed trainer. For unit tests, debugging and small runs."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from elmm_ray.config import Config
from elmm_ray.data.kg import KnowledgeGraph
from elmm_ray.eval.evaluate import encode_all_entities, evaluate_model
from elmm_ray.models.lora import save_trainable
from elmm_ray.rundir import RunDir, write_json_atomic
from elmm_ray.train.context import ModelContext, build_context
from elmm_ray.train.metrics import MetricsLogger
from elmm_ray.train.step import QueryBatches, compute_loss

log = logging.getLogger(__name__)

MODEL_SUBDIR = "model"


def lr_lambda(warmup: int, total: int):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    steps = cfg.train.epochs * steps_per_epoch
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


def init_entity_table(ctx: ModelContext, batch_size: int, run_dir: RunDir | None = None) -> None:
    """Each entity's own encoding: read from ``<run_dir>/entity_init.safetensors`` when the
    distributed entity-init stage wrote it, else computed here."""
    path = run_dir.path("entity_init.safetensors") if run_dir else None
    if path is not None and path.is_file():
        from safetensors.torch import load_file

        vectors = load_file(str(path))["entity_table"]
    else:
        vectors = encode_all_entities(ctx.model, ctx.collator, ctx.features, batch_size)
    ctx.model.init_entity_table(vectors)


def train_local(cfg: Config, kg: KnowledgeGraph, shard_dir: Path,
                ctx: ModelContext | None = None, *, out_subdir: str = "train",
                init_table: bool = True, show_progress: bool = True) -> dict:
    """Train, validate each epoch, evaluate on ``eval.split``; save into
    ``<run_dir>/<out_subdir>``. Given ``ctx`` (e.g. a pruned model to fine-tune) it trains
    that model; ``init_table=False`` keeps its entity table."""
    run_dir = RunDir(cfg.run_dir)
    out = run_dir.path(out_subdir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = ctx or build_context(cfg, kg, run_dir, shard_dir)
    model, tc = ctx.model, cfg.train
    if init_table:
        init_entity_table(ctx, cfg.eval.batch_size, run_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    batches = QueryBatches(kg.queries("train", tc.both_directions), tc.batch_size, tc.seed)
    steps = total_steps(cfg, batches.steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc.warmup_steps, steps))
    known = kg.filter_index(("train",))
    generator = torch.Generator().manual_seed(tc.seed)
    eval_every = tc.eval_every or batches.steps_per_epoch
    logger = MetricsLogger(out, tc.mlflow_uri)
    history: list[dict] = []
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    bar = tqdm(total=steps, desc="train", disable=not show_progress, dynamic_ncols=True)
    step = 0
    for epoch, _, queries in batches:
        if step >= steps or (tc.max_minutes and time.perf_counter() - start > 60 * tc.max_minutes):
            break
        parts = compute_loss(model, ctx.collator, ctx.features, queries, known,
                             num_negatives=tc.num_negatives,
                             knowledge_weight=tc.knowledge_weight,
                             in_batch_negatives=tc.in_batch_negatives, generator=generator)
        (parts.loss / tc.grad_accum).backward()
        if (step + 1) % tc.grad_accum == 0:
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        losses.append(float(parts.loss.detach()))
        bar.update(1)
        bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.3f}")
        if step % eval_every == 0 or step == steps:
            val = evaluate_model(model, ctx.collator, ctx.features, kg, split="valid",
                                 batch_size=cfg.eval.batch_size, max_queries=tc.val_max_queries,
                                 ks=cfg.eval.hits_at)
            record = {"step": step, "epoch": epoch, "loss": sum(losses[-eval_every:]) /
                      len(losses[-eval_every:]), "task_loss": parts.task,
                      "knowledge_loss": parts.knowledge, "lr": scheduler.get_last_lr()[0],
                      "val_mrr": val["overall"]["mrr"], "val_hits1": val["overall"]["hits@1"],
                      "seconds": time.perf_counter() - start}
            history.append(record)
            logger.log(record)
            bar.write(f"step {step}: loss {record['loss']:.4f}  val MRR {record['val_mrr']:.4f}"
                      f"  val Hits@1 {record['val_hits1']:.4f}")
    bar.close()
    train_seconds = time.perf_counter() - start
    logger.finish(history, steps=step, seconds=train_seconds)
    save_trainable(model, out / MODEL_SUBDIR)
    metrics = evaluate_model(model, ctx.collator, ctx.features, kg, split=cfg.eval.split,
                             batch_size=cfg.eval.batch_size, max_queries=cfg.eval.max_queries,
                             ks=cfg.eval.hits_at)
    summary = {"steps": step, "train_seconds": train_seconds, "losses": losses,
               "history": history, "metrics": metrics}
    write_json_atomic(out / "summary.json", summary)
    return summary

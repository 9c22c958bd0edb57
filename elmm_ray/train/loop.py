"""``train_loop_per_worker``: one Ray Train worker running DeepSpeed ZeRO + LoRA.

Everything arrives in ``train_loop_config`` (the resolved config as a dict); deepspeed is
imported inside the loop. Each worker builds the same model from the run directory,
reads the training queries from its dataset shard (every worker receives all queries and
takes its slice through :class:`QueryBatches`, so the data order is exact on resume),
and runs :func:`elmm_ray.train.step.compute_loss`.

Validation: every rank computes the same validation subset (identical figures; under
ZeRO-3 all ranks must take part in every forward anyway). Checkpoints: every rank saves
its DeepSpeed shards plus its own data position and sampler state, then reports.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from elmm_ray.config import Config, config_from_dict
from elmm_ray.rundir import RunDir

CHECKPOINT_TAG = "ckpt"
FAULT_MARKER = ".fault_injected"


def _rank_state_path(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"rank{rank:04d}_state.pt"


def save_rank_state(directory: str | Path, rank: int, state: dict) -> None:
    """Data position + sampler state of one rank (plain tensors and numbers only)."""
    torch.save(state, _rank_state_path(directory, rank))


def load_rank_state(directory: str | Path, rank: int) -> dict:
    path = _rank_state_path(directory, rank)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {directory} has no state for rank {rank}; was it "
                                "written with a different number of workers?")
    return torch.load(path, weights_only=True)


def rank_memory_mb(engine, model: torch.nn.Module) -> tuple[float, float]:
    """(parameters, optimizer state) this rank holds, in MiB: under ZeRO-3 only its
    parameter partition; optimizer state = moments + fp32 master partitions."""
    params = 0
    for p in model.parameters():
        part = getattr(p, "ds_tensor", None)
        held = part if part is not None else p
        params += held.numel() * held.element_size()
    optimizer_bytes = 0
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in getattr(inner, "state", {}).values():
        optimizer_bytes += sum(v.numel() * v.element_size() for v in state.values()
                               if torch.is_tensor(v))
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        for flat in getattr(engine.optimizer, attr, None) or []:
            optimizer_bytes += flat.numel() * flat.element_size()
    return params / 2**20, optimizer_bytes / 2**20


def _maybe_inject_fault(cfg: Config, rank: int, step: int, run_dir: RunDir) -> None:
    """Test hook (``train.fail_at_step``): rank 0 of the first attempt dies at that step."""
    if not cfg.train.fail_at_step or rank != 0 or step != cfg.train.fail_at_step:
        return
    marker = run_dir.path("train", FAULT_MARKER)
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"worker died on purpose at step {step}\n")
    os._exit(1)


def train_loop_per_worker(config: dict) -> None:
    """The worker function given to ``TorchTrainer``."""
    cfg = config_from_dict(config["cfg"])
    use_gpu = cfg.train.use_gpu
    from elmm_ray.train import deepspeed as ds_setup

    if not use_gpu:
        ds_setup.prepare_cpu_environment()
    torch.set_num_threads(cfg.train.threads_per_worker)

    import deepspeed
    import ray.train

    from elmm_ray import pipeline
    from elmm_ray.eval.evaluate import evaluate_model
    from elmm_ray.train.context import build_context
    from elmm_ray.train.local import init_entity_table, lr_lambda, total_steps
    from elmm_ray.train.metrics import MetricsLogger
    from elmm_ray.train.step import QueryBatches, compute_loss

    ds_setup.disable_jit_ops()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.train.seed)
    run_dir = RunDir(cfg.run_dir)
    kg = pipeline.load_dataset(cfg)
    shard_dir = pipeline.shard_dir(cfg)
    ctx = build_context(cfg, kg, run_dir, shard_dir)
    model = ctx.model
    init_entity_table(ctx, cfg.eval.batch_size, run_dir)

    shard = ray.train.get_dataset_shard("train")
    queries = np.concatenate([b["data"] for b in shard.iter_batches(batch_format="numpy",
                                                                     batch_size=65536)])
    batches = QueryBatches(queries, cfg.train.batch_size, cfg.train.seed, shard=rank,
                           num_shards=world)
    steps = total_steps(cfg, batches.steps_per_epoch)
    params = [p for p in model.parameters() if p.requires_grad]
    client_optimizer = None
    if ds_setup.uses_client_optimizer(cfg, use_gpu):
        client_optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate,
                                             weight_decay=cfg.train.weight_decay)
    schedule = lr_lambda(cfg.train.warmup_steps, steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=client_optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=ds_setup.deepspeed_config(cfg, use_gpu=use_gpu),
    )
    generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank)
    known = kg.filter_index(("train",))
    step, history, seconds_before = 0, [], 0.0

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            engine.load_checkpoint(directory, tag=CHECKPOINT_TAG, load_module_strict=False)
            state = load_rank_state(directory, rank)
        batches.load_state_dict(state["data"])
        generator.set_state(state["generator"])
        step, history = int(state["step"]), json.loads(state["history"])
        seconds_before = float(state["seconds"])

    logger = MetricsLogger(run_dir.path("train"), cfg.train.mlflow_uri, enabled=rank == 0,
                           resume=bool(checkpoint))
    eval_every = cfg.train.eval_every or batches.steps_per_epoch
    samples_per_step = cfg.train.batch_size * world
    start = time.perf_counter() - seconds_before
    eval_seconds = float(state["eval_seconds"]) if checkpoint else 0.0
    memory: dict = {}
    window_start, window_losses = time.perf_counter(), []
    model.train()
    for epoch, _, batch in batches:
        if step >= steps:
            break
        _maybe_inject_fault(cfg, rank, step + 1, run_dir)
        parts = compute_loss(model, ctx.collator, ctx.features, batch, known,
                             num_negatives=cfg.train.num_negatives,
                             knowledge_weight=cfg.train.knowledge_weight,
                             in_batch_negatives=cfg.train.in_batch_negatives,
                             generator=generator)
        engine.backward(parts.loss)
        engine.step()
        step += 1
        if not memory:
            param_mb, optimizer_mb = rank_memory_mb(engine, model)
            memory = {"param_mb": param_mb, "optimizer_mb": optimizer_mb}
        window_losses.append(float(parts.loss.detach()))
        if rank == 0 and (step % max(1, steps // 20) == 0 or step == steps):
            elapsed = time.perf_counter() - window_start
            rate = len(window_losses) * samples_per_step / max(elapsed, 1e-9)
            eta = (steps - step) * samples_per_step / max(rate, 1e-9)
            print(f"[train] step {step}/{steps} epoch {epoch} loss "
                  f"{np.mean(window_losses):.4f} {rate:.1f} samples/s ETA {eta:.0f}s", flush=True)
        if step % eval_every == 0 or step == steps:
            eval_start = time.perf_counter()
            val = evaluate_model(model, ctx.collator, ctx.features, kg, split="valid",
                                 batch_size=cfg.eval.batch_size,
                                 max_queries=cfg.train.val_max_queries, ks=cfg.eval.hits_at)
            record = {"step": step, "epoch": epoch, "loss": float(np.mean(window_losses)),
                      "task_loss": parts.task, "knowledge_loss": parts.knowledge,
                      "lr": float(scheduler.get_last_lr()[0]) if scheduler else 0.0,
                      "val_mrr": val["overall"]["mrr"], "val_hits1": val["overall"]["hits@1"],
                      "seconds": time.perf_counter() - start, "workers": world, **memory}
            eval_seconds += time.perf_counter() - eval_start
            record["train_seconds"] = record["seconds"] - eval_seconds
            history.append(record)
            logger.log(record)
            window_start, window_losses = time.perf_counter(), []
            with tempfile.TemporaryDirectory(prefix="elmm_ckpt_") as tmp:
                engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG, exclude_frozen_parameters=True)
                save_rank_state(tmp, rank, {
                    "data": batches.state_dict(), "generator": generator.get_state(),
                    "step": step, "history": json.dumps(history),
                    "seconds": time.perf_counter() - start, "eval_seconds": eval_seconds})
                ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    from elmm_ray.models.lora import save_trainable

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None,
                                           enabled=cfg.deepspeed.zero_stage == 3):
        if rank == 0:
            save_trainable(model, run_dir.path("train", "model"))
    if rank == 0:
        logger.finish(history, steps=step, seconds=time.perf_counter() - start)

"""What differs between the training backends, behind the loop's two adapters
(:mod:`elmm_ray.train.loop`):

- an **engine** (backward / step / learning rate / memory): :class:`TorchEngine` (AdamW,
  warm-up + cosine, accumulation, clipping: the local backend) or :class:`DeepSpeedEngine`
  (a ``deepspeed.initialize`` engine: ZeRO-2/3 on Ray Train workers);
- a **session** (rank, world size, collectives, reporting, checkpoints, preemption):
  :class:`LocalSession` (one process) or :class:`RaySession` (``ray.train.report`` with the
  portable checkpoint of :mod:`elmm_ray.train.portable`: resumable at any world size);

and the preemption policy both sessions answer to (:func:`checkpoint_due`,
:func:`hold_until_preempted`).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from elmm_ray.config import Config
from elmm_ray.eval.evaluate import pad_rows
from elmm_ray.faults import fault_point
from elmm_ray.train.checkpoint_integrity import record_checkpoint
from elmm_ray.train.portable import load_rng, save_portable

# Preemption: the just-in-time checkpoint is written when the node's deadline is this close
# (at least; more when checkpoints or steps take longer: see checkpoint_due).
PREEMPTION_MARGIN_S = 5.0
# ... and the workers then wait up to this long past the deadline for the node to go before
# training on (a drain that was cancelled).
PREEMPTION_HOLD_S = 30.0


def lr_lambda(warmup: int, total: int):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


# --- engines ------------------------------------------------------------------------------------


class TorchEngine:
    """AdamW + warm-up/cosine schedule, gradient accumulation and clipping, in one process."""

    def __init__(self, params: list[torch.nn.Parameter], cfg: Config, steps: int) -> None:
        tc = cfg.train
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=tc.learning_rate,
                                           weight_decay=tc.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(tc.warmup_steps, steps))
        self.grad_accum, self.grad_clip = tc.grad_accum, tc.grad_clip
        self.micro_steps = 0

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        """One micro-step; the optimizer and the learning-rate schedule step at the end of
        each accumulation (the schedule counts optimizer steps, as DeepSpeed's does)."""
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum == 0:
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def memory_mb(self, model: torch.nn.Module) -> dict:
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        state = sum(v.numel() * v.element_size() for s in self.optimizer.state.values()
                    for v in s.values() if torch.is_tensor(v))
        return {"param_mb": params / 2**20, "optimizer_mb": state / 2**20}


class DeepSpeedEngine:
    """A ``deepspeed.initialize`` engine behind the same four calls."""

    def __init__(self, engine, scheduler) -> None:
        self.engine, self.scheduler = engine, scheduler

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0]) if self.scheduler else 0.0

    def memory_mb(self, model: torch.nn.Module) -> dict:
        """Parameters (under ZeRO-3 only this rank's partition) and optimizer state
        (moments + fp32 master partitions) this rank holds."""
        params = 0
        for p in model.parameters():
            part = getattr(p, "ds_tensor", None)
            held = part if part is not None else p
            params += held.numel() * held.element_size()
        optimizer = self.engine.optimizer
        state_bytes = 0
        inner = getattr(optimizer, "optimizer", optimizer)
        for state in getattr(inner, "state", {}).values():
            state_bytes += sum(v.numel() * v.element_size() for v in state.values()
                               if torch.is_tensor(v))
        for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            for flat in getattr(optimizer, attr, None) or []:
                state_bytes += flat.numel() * flat.element_size()
        return {"param_mb": params / 2**20, "optimizer_mb": state_bytes / 2**20}


# --- sessions -----------------------------------------------------------------------------------


class LocalSession:
    """One process: rank 0 of 1, no checkpoints; ``report`` (e.g. ``ray.tune.report`` in a
    Tune trial) receives every validation record."""

    rank, world = 0, 1
    resumed_state: dict | None = None

    def __init__(self, report: Callable[[dict], None] | None = None) -> None:
        self._report = report

    def report(self, record: dict, state: dict) -> None:
        if self._report is not None:
            self._report(record)

    def agree_to_stop(self, stop: bool) -> bool:
        return stop

    def any_rank(self, flag: bool) -> bool:
        return flag

    checkpoint_seconds = 0.0

    def preempted(self) -> dict | None:
        return None

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def gather_rows(self, local: torch.Tensor, counts) -> torch.Tensor:
        return local

    def all_sum(self, value: float) -> float:
        return value


CHECKPOINT_PREFIX = "elmm_ckpt_"  # + "<pid>_": a worker's checkpoint on its way out
STALE_CHECKPOINT_S = 3600.0


def remove_stale_checkpoint_dirs(root: str | Path | None = None,
                                 min_age_s: float = STALE_CHECKPOINT_S) -> list[Path]:
    """Remove the temporary checkpoint directories that killed workers left in ``root`` (the
    temp dir): a name ``elmm_ckpt_<pid>_*`` whose process is gone and that is older than
    ``min_age_s`` (an hour: a slow save of a live process elsewhere is never touched).
    Returns what was removed."""
    import psutil

    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{CHECKPOINT_PREFIX}*_*"):
        pid = path.name[len(CHECKPOINT_PREFIX):].split("_", 1)[0]
        try:
            old = time.time() - path.stat().st_mtime > min_age_s
        except OSError:
            continue
        if pid.isdigit() and old and path.is_dir() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class RaySession:
    """A Ray Train worker: every rank takes part in gathering the portable checkpoint
    (:mod:`elmm_ray.train.portable`: whole trainable tensors, AdamW moments, schedule, data
    position, RNG), rank 0 writes and reports it; a restarted or resumed run, at any worker
    count, continues from ``ray.train.get_checkpoint()`` (``resumed_state``, loaded by
    :func:`train_loop_per_worker`)."""

    def __init__(self, engine, scheduler, model, resumed_state: dict | None = None) -> None:
        import ray.train

        self.train = ray.train
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.engine, self.scheduler, self.model = engine, scheduler, model
        self.resumed_state = resumed_state
        self.checkpoint_seconds = 0.0  # how long the last report with a checkpoint took
        remove_stale_checkpoint_dirs()  # what a killed worker on this node left
        # NCCL groups carry CUDA tensors only; gloo (CPU) takes CPU tensors.
        nccl = torch.distributed.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else None

    def _rng_states(self) -> list[dict]:
        """Every rank's torch CPU (and CUDA) generator state, gathered."""
        cpu = self.all_gather(torch.get_rng_state().unsqueeze(0))
        cuda = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda = self.all_gather(torch.cuda.get_rng_state().unsqueeze(0))
        return [{"cpu": cpu[r].clone(), "cuda": None if cuda is None else cuda[r].clone()}
                for r in range(self.world)]

    def report(self, record: dict, state: dict) -> None:
        started = time.perf_counter()
        rng = self._rng_states()
        with tempfile.TemporaryDirectory(prefix=f"{CHECKPOINT_PREFIX}{os.getpid()}_") as tmp:
            generator = state.pop("generator")
            save_portable(tmp, self.model, self.engine.optimizer, self.scheduler,
                          {**state, "world": self.world}, generator, rng, self.rank)
            if self.rank == 0:
                record_checkpoint(tmp, self.rank)
            fault_point("train.checkpoint")
            checkpoint = self.train.Checkpoint.from_directory(tmp) if self.rank == 0 else None
            self.train.report(record, checkpoint=checkpoint)
        self.checkpoint_seconds = time.perf_counter() - started

    def agree_to_stop(self, stop: bool) -> bool:
        """Every rank stops at the same step (a time limit is measured per rank)."""
        return self.any_rank(stop)

    def preempted(self) -> dict | None:
        """A node of this run is being drained (a spot reclaim, ``ray drain-node --reason
        DRAIN_NODE_REASON_PREEMPTION``): its deadline and ranks; ``None`` otherwise. Every
        rank calls it at every step (Ray Train agrees on one answer across the ranks)."""
        info = self.train.get_preemption_info()
        if info is None:
            return None
        return {"deadline_ms": info.deadline_ms, "ranks": info.preempted_ranks,
                "nodes": info.preempted_node_ids}

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (every rank gets the same answer)."""
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's equally shaped ``tensor``, concatenated in rank order."""
        local = tensor.contiguous().to(self.device or tensor.device)
        parts = [torch.empty_like(local) for _ in range(self.world)]
        torch.distributed.all_gather(parts, local)
        return torch.cat(parts).to(tensor.device)

    def gather_rows(self, local: torch.Tensor, counts) -> torch.Tensor:
        """Every rank's rows (rank r holds ``counts[r]``) in rank order; this rank's own rows
        keep their gradient (the others are values: their gradients are their ranks')."""
        width = max(counts)
        sent = pad_rows(local.detach(), width)
        parts = self.all_gather(sent).split(width)
        return torch.cat([local if r == self.rank else parts[r][:counts[r]]
                          for r in range(self.world)])

    def all_sum(self, value: float) -> float:
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(total)
        return float(total.item())


def resumed_state(directory: str | Path, state: dict, rank: int, seed: int) -> dict:
    """What :func:`run_loop` continues from: a portable checkpoint's loop state with this
    rank's generator states (:func:`elmm_ray.train.portable.load_rng`)."""
    rng = load_rng(directory, rank, seed, int(state["step"]))
    return {**state, "generator": rng["generator"], "torch_rng": rng["cpu"],
            "cuda_rng": rng["cuda"]}


def checkpoint_due(notice: dict, step_seconds: float, checkpoint_seconds: float) -> bool:
    """Whether the just-in-time checkpoint for a preemption ``notice`` is due now: at once
    without a deadline, else once the time left is within a margin of a few checkpoints and
    steps (training goes on until then: no step done before the checkpoint is lost, and
    none after it is taken, see :func:`hold_until_preempted`)."""
    if not notice.get("deadline_ms"):
        return True
    left = notice["deadline_ms"] / 1000 - time.time()
    return left <= max(PREEMPTION_MARGIN_S, 3 * checkpoint_seconds + 2 * step_seconds)


def hold_until_preempted(notice: dict) -> None:
    """After the just-in-time checkpoint: take no more steps (they would be redone) until the
    node goes and Ray Train restarts the run without it, or, if it is still there
    :data:`PREEMPTION_HOLD_S` past the deadline (a cancelled drain), train on."""
    if not notice.get("deadline_ms"):
        return
    until = notice["deadline_ms"] / 1000 + PREEMPTION_HOLD_S
    while time.time() < until:
        time.sleep(0.5)


def resume_line(resume: dict) -> str:
    """The console's line for a resumed run."""
    return (f"resumed from step {resume['step']}: checkpoint of {resume['from_workers']} "
            f"worker(s), now {resume['workers']}")

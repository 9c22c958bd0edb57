"""Checkpoints that do not depend on the number of workers.

A Ray Train checkpoint of a training run holds, in ``<checkpoint>/portable/``:
- ``weights.safetensors``: every trainable tensor (LoRA, MVTC, projector, readout, entity
  table, compensation maps) by parameter name, in fp32 (the optimizer's master copy);
- ``optimizer.safetensors``: AdamW's moments ``exp_avg.<name>`` and ``exp_avg_sq.<name>``,
  gathered whole from the ZeRO partitions;
- ``state.json``: the optimizer step count, the learning-rate schedule's state, the data
  position (epoch, optimizer step, global batch), the samples consumed, the run's history,
  losses and clocks, and the world size that wrote it;
- ``rng.pt``: the negatives' generator (the same on every rank) and every rank's torch CPU
  and CUDA generator states (dropout draws): a resume at the same world size continues them
  exactly; at another, ranks beyond the old world start from a seed of (seed, step, rank).

Every rank takes part in the gathering (ZeRO's collectives); rank 0 writes. On resume the
weights are loaded into the model before ``deepspeed.initialize`` (which partitions them and
makes its fp32 masters from them), the moments and the schedule after it, through
DeepSpeed's ``safe_set_full_optimizer_state`` (ZeRO 1-3) or the torch optimizer itself
(ZeRO 0). Nothing in these files depends on the world size, so a run written by W workers
resumes on any W'.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PORTABLE = "portable"
WEIGHTS, OPTIMIZER, STATE, RNG = ("weights.safetensors", "optimizer.safetensors", "state.json",
                                  "rng.pt")
MOMENTS = ("exp_avg", "exp_avg_sq")


def trainable_named(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable parameters by name, in module order (the same on every rank)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _inner_optimizer(optimizer):
    """The torch optimizer under DeepSpeed's wrappers (ZeRO keeps it as ``.optimizer``)."""
    while hasattr(optimizer, "optimizer") and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _partitioned(param) -> bool:
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _check_reachable(model: torch.nn.Module, optimizer) -> None:
    """DeepSpeed without ZeRO under bf16/fp16 (FP16_Optimizer / BF16_Optimizer) keeps its
    fp32 masters and moments in flat copies no per-parameter API reaches: refuse it."""
    if hasattr(optimizer, "fp32_groups_flat") and not any(
            _partitioned(p) for _, p in trainable_named(model)):
        raise ValueError("DeepSpeed without ZeRO under bf16/fp16 keeps its fp32 masters and "
                         "moments where a portable checkpoint cannot reach them; use "
                         "deepspeed.zero_stage >= 1 (or fp32)")


def _adam_step(optimizer) -> float:
    """AdamW's step count (bias correction), from any parameter's state (0: none yet)."""
    for state in _inner_optimizer(optimizer).state.values():
        if "step" in state:
            step = state["step"]
            return float(step.item() if torch.is_tensor(step) else step)
    return 0.0


def gather_training_state(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """Every trainable tensor and its AdamW moments, whole, in fp32 (a collective under
    ZeRO: every rank calls it, in the same order). Returns (weights, moments) by name."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    _check_reachable(model, optimizer)
    inner = _inner_optimizer(optimizer)
    weights, moments = {}, {}
    for name, param in trainable_named(model):
        if _partitioned(param):
            weights[name] = safe_get_full_fp32_param(param).detach().float().cpu()
            for key in MOMENTS:
                value = safe_get_full_optimizer_state(param, key)
                if value is not None:
                    moments[f"{key}.{name}"] = value.detach().float().cpu()
        else:  # ZeRO 0 (or a plain torch optimizer): the tensors themselves
            weights[name] = param.detach().float().cpu()
            for key in MOMENTS:
                value = inner.state.get(param, {}).get(key)
                if value is not None:
                    moments[f"{key}.{name}"] = value.detach().float().cpu()
    return weights, moments


def save_portable(directory: str | Path, model: torch.nn.Module, optimizer, scheduler,
                  state: dict, generator: torch.Tensor, rng_states: list[dict],
                  rank: int) -> None:
    """Write the portable checkpoint into ``<directory>/portable`` (every rank calls it;
    rank 0 writes). ``state``: the loop's JSON-able state (step, data position, history...);
    ``generator``: the negatives' generator state; ``rng_states``: every rank's
    ``{"cpu": ByteTensor, "cuda": ByteTensor | None}``."""
    weights, moments = gather_training_state(model, optimizer)
    if rank != 0:
        return
    out = Path(directory) / PORTABLE
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / WEIGHTS))
    save_file({k: v.contiguous() for k, v in moments.items()}, str(out / OPTIMIZER))
    scheduler_state = scheduler.state_dict() if scheduler is not None else None
    full = {**state, "adam_step": _adam_step(optimizer), "scheduler": scheduler_state}
    (out / STATE).write_text(json.dumps(full))
    torch.save({"generator": generator, "ranks": rng_states}, out / RNG)


def read_state(directory: str | Path) -> dict:
    """The ``state.json`` of a portable checkpoint, with a clear error when it is not one."""
    path = Path(directory) / PORTABLE / STATE
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {directory} has no {PORTABLE}/{STATE}: it was written by an older "
            "version (DeepSpeed shards tied to their worker count); delete the Ray Train run "
            "folder it is in to train again from step 0")
    return json.loads(path.read_text())


def load_weights(directory: str | Path, model: torch.nn.Module) -> dict:
    """Copy a portable checkpoint's trainable tensors into ``model`` (before
    ``deepspeed.initialize``); every name must match. Returns the checkpoint's state."""
    state = read_state(directory)
    weights = load_file(str(Path(directory) / PORTABLE / WEIGHTS))
    named = dict(trainable_named(model))
    missing, unexpected = sorted(set(named) - set(weights)), sorted(set(weights) - set(named))
    if missing or unexpected:
        raise ValueError(f"checkpoint {directory} does not fit this model: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, param in named.items():
            if tuple(weights[name].shape) != tuple(param.shape):
                raise ValueError(f"checkpoint {directory}: {name} has shape "
                                 f"{tuple(weights[name].shape)}, the model {tuple(param.shape)}")
            param.copy_(weights[name].to(param.dtype))
    return state


def load_optimizer(directory: str | Path, model: torch.nn.Module, optimizer, scheduler,
                   state: dict) -> None:
    """Set the fp32 master weights, AdamW's moments and step count and the schedule from a
    portable checkpoint (after ``deepspeed.initialize``, which made its masters from the
    model's weights, rounded to bf16/fp16 under mixed precision; every rank calls it, in
    the same order)."""
    moments = load_file(str(Path(directory) / PORTABLE / OPTIMIZER))
    weights = load_file(str(Path(directory) / PORTABLE / WEIGHTS))
    inner = _inner_optimizer(optimizer)
    _check_reachable(model, optimizer)
    step = state["adam_step"]
    _create_zero_states(optimizer, inner, step)
    for name, param in trainable_named(model):
        if _partitioned(param):  # exact fp32, not the bf16/fp16 model copy's rounding
            _set_full(param, weights[name])
        for key in MOMENTS:
            value = moments.get(f"{key}.{name}")
            if value is None:
                continue
            if _partitioned(param):
                _set_full(param, value, key)
            else:
                slot = inner.state[param]
                slot.setdefault("step", torch.tensor(step))
                slot[key] = value.to(param.device, param.dtype)
    for slot in inner.state.values():  # bias correction continues where it stopped
        if "step" in slot:  # a tensor for torch's optimizers, an int for DeepSpeed's own
            slot["step"] = (torch.tensor(step, dtype=slot["step"].dtype)
                            if torch.is_tensor(slot["step"]) else type(slot["step"])(step))
    if scheduler is not None and state.get("scheduler"):
        scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(),
                             strict=True):
            group["lr"] = lr


def _set_full(param, value: torch.Tensor, key: str | None = None) -> None:
    """Set a ZeRO-partitioned parameter's whole fp32 master (``key`` None) or optimizer
    state ``key`` from ``value``. Under ZeRO-3 each rank sets its own partition from the
    value zero-padded to the partitions' total: DeepSpeed 0.19's
    ``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state`` take the last rank's
    slice past the end when the world size does not divide the parameter (measured: a
    1,024-element bias on 3 ranks)."""
    from deepspeed.utils import (
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    if not hasattr(param, "ds_id"):  # ZeRO 1/2
        if key is None:
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, key)
        return
    part = param.ds_tensor.numel()
    rank = param._z3_optimizer._get_param_partition_rank(param)
    flat = value.flatten().float()
    flat = torch.cat([flat, flat.new_zeros(max(0, part * (rank + 1) - flat.numel()))])
    mine = flat[rank * part : (rank + 1) * part].to(param.ds_tensor.device)
    if key is None:
        safe_set_local_fp32_param(param, mine)
    else:
        safe_set_local_optimizer_state(param, mine, key)


def _create_zero_states(optimizer, inner, step: float) -> None:
    """AdamW creates its state at the first step; ZeRO links its per-parameter views of it
    then. A resume sets the moments before any step: create them (zeros) on ZeRO's flat fp32
    partitions and link them, so ``safe_set_full_optimizer_state`` has somewhere to write."""
    flats = (getattr(optimizer, "single_partition_of_fp32_groups", None)  # ZeRO 1/2
             or getattr(optimizer, "fp32_partitioned_groups_flat", None) or [])  # ZeRO 3
    for flat in flats:
        slot = inner.state[flat]
        if not all(key in slot for key in MOMENTS):
            # torch's AdamW keeps its step as a tensor, DeepSpeed's fused / CPU Adam as an int
            slot["step"] = (torch.tensor(float(step)) if isinstance(inner, torch.optim.Optimizer)
                            and not type(inner).__module__.startswith("deepspeed")
                            else int(step))
            for key in MOMENTS:
                slot[key] = torch.zeros_like(flat)
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def load_rng(directory: str | Path, rank: int, seed: int, step: int) -> dict:
    """The negatives' generator state and this rank's torch CPU / CUDA generator states: its
    own when the checkpoint's world had this rank, else seeded from (seed, step, rank)."""
    saved = torch.load(Path(directory) / PORTABLE / RNG, weights_only=True)
    ranks = saved["ranks"]
    if rank < len(ranks):
        return {"generator": saved["generator"], **ranks[rank]}
    fresh = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    return {"generator": saved["generator"], "cpu": fresh.get_state(), "cuda": None}

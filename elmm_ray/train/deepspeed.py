"""DeepSpeed configuration generated from the schema; CPU and GPU differ only here.

CPU (tests, demo): fp32, a torch AdamW *client* optimizer (DeepSpeed's own CPU Adam ops
JIT-compile for about a minute), ``zero_allow_untested_optimizer``, gloo, and the
shared-memory comm op disabled before init (it JIT-compiles and serves only inference).
GPU: bf16 (or fp16), DeepSpeed's fused AdamW, or DeepSpeedCPUAdam with optimizer offload.
"""

from __future__ import annotations

import logging
import os
import re

from elmm_ray.config import Config

log = logging.getLogger(__name__)


def resolve_precision(cfg: Config, use_gpu: bool) -> str:
    precision = cfg.deepspeed.precision
    if precision == "auto":
        return "bf16" if use_gpu else "fp32"
    if precision in ("bf16", "fp16") and not use_gpu:
        raise ValueError(f"`deepspeed.precision` = {precision!r} needs GPUs "
                         "(`train.use_gpu` = true); use 'fp32' or 'auto' on CPU")
    return precision


def uses_client_optimizer(cfg: Config, use_gpu: bool) -> bool:
    """CPU runs bring a torch AdamW; GPU runs let DeepSpeed build its fused optimizer."""
    return not use_gpu


def deepspeed_config(cfg: Config, *, use_gpu: bool, world: int = 1) -> dict:
    """The ``ds_config`` dict for ``deepspeed.initialize`` on ``world`` workers."""
    tc, ds = cfg.train, cfg.deepspeed
    precision = resolve_precision(cfg, use_gpu)
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage >= 2:
        zero.update({"overlap_comm": use_gpu, "contiguous_gradients": True,
                     "reduce_bucket_size": 5e7})
    if ds.zero_stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": True,
                     "stage3_param_persistence_threshold": 1e4})
    if ds.offload_optimizer and use_gpu:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params and use_gpu:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict = {
        # The most queries a worker encodes per micro-step (the global batch split over the
        # accumulation steps and the workers; DeepSpeed uses it for its throughput figures).
        "train_micro_batch_size_per_gpu": -(-tc.global_batch_size // (tc.grad_accum * world)),
        "gradient_accumulation_steps": tc.grad_accum,
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # progress is ours
        "wall_clock_breakdown": False,
    }
    if tc.grad_clip:
        config["gradient_clipping"] = tc.grad_clip
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    if uses_client_optimizer(cfg, use_gpu):
        config["zero_allow_untested_optimizer"] = True
        config["zero_force_ds_cpu_optimizer"] = False
    else:
        config["optimizer"] = {"type": "AdamW", "params": {
            "lr": tc.learning_rate, "weight_decay": tc.weight_decay, "betas": [0.9, 0.999]}}
    return config


def register_zero3_external_weights(model) -> int:
    """Before ``deepspeed.initialize`` with ZeRO-3: MVTC's pooling attentions read their
    children's weights outside those children's forward (they fold ``key_proj`` and the
    context norm into their queries, :func:`elmm_ray.models.mvtc.folded_pooling`; the
    children are never called). ZeRO-3 gathers a module's own weights around its forward
    and finds other weights read there by itself only inside ``engine(...)``; the loop calls
    the model's own methods. So those weights are registered as the attention's external
    parameters: gathered around its forward and its backward. Returns how many."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    from elmm_ray.models.mvtc import CrossAttention

    count = 0
    for module in model.modules():
        if isinstance(module, CrossAttention) and module.raw_values:
            for param in (*module.key_proj.parameters(), *module.context_norm.parameters()):
                register_external_parameter(module, param)
                count += 1
    return count


def prepare_cpu_environment() -> None:
    """Before importing deepspeed on a CPU worker: CPU accelerator, no JIT-compiled ops."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("DS_BUILD_OPS", "0")


def prepare_gpu_environment() -> None:
    """Before DeepSpeed JIT-builds its fused ops on a GPU worker: its arch parser reads
    ``TORCH_CUDA_ARCH_LIST`` and fails on arch-specific entries such as ``9.0a`` (Hopper
    images set them: "invalid literal for int() with base 10: '0a'"); keep the numeric
    ones (``9.0``, ``8.0+PTX``), which build the same kernels for these ops."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs:
        return
    kept = []
    for arch in archs.replace(",", ";").replace(" ", ";").split(";"):
        base, _, ptx = arch.partition("+")
        base = re.sub(r"[a-z]+$", "", base)
        if base and all(part.isdigit() for part in base.split(".")):
            entry = base + ("+" + ptx if ptx else "")
            if entry not in kept:
                kept.append(entry)
    if kept and ";".join(kept) != archs:
        log.warning("TORCH_CUDA_ARCH_LIST=%r -> %r for DeepSpeed's JIT ops (it cannot parse "
                    "arch suffixes)", archs, ";".join(kept))
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(kept)


def disable_jit_ops() -> None:
    """The shm-comm op compiles for ~30 s at init and only serves inference all-reduce."""
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False

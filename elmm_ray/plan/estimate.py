"""Per-stage figures of a plan: GPU memory per worker, FLOPs, time at a stated MFU, GPU-hours
and cost, from the meta-device model (:mod:`elmm_ray.plan.meta`), the dataset's counts and the
hardware (:mod:`elmm_ray.plan.hardware`).

What is measured and what is assumed: parameter counts, shapes and the training activations
(tensors autograd keeps, counted on meta tensors through the model's own code with
flash-style attention) come from the model; model states follow DeepSpeed's own accounting
(``estimate_zero{2,3}_model_states_mem_needs``: 16-bit weights, 16-bit + fp32 gradients,
fp32 master weights and Adam moments, partitioned over the workers); inference peaks, the
runtime reserve and the MFU are estimates, named as such in the output."""

from __future__ import annotations

import dataclasses
import math

from elmm_ray.config import Config, max_workers
from elmm_ray.plan.hardware import Counts, Hardware
from elmm_ray.plan.meta import MetaModel, activation_bytes, linear_macs

GIB = 1024**3
RESERVE_GIB = 2.0  # CUDA context, NCCL buffers, allocator fragmentation (assumed)
RESERVE_SHARE = 0.05  # of the rest (assumed)
BUCKET_ELEMENTS = 5e7  # reduce_bucket_size of elmm_ray.train.deepspeed (x2 with overlap_comm)


@dataclasses.dataclass
class Stage:
    name: str
    gpus: int
    memory: dict[str, float]  # GiB per worker, by part ("total" included)
    flops: float
    note: str = ""

    def hours(self, hw: Hardware, precision: str, mfu: float) -> float:
        peak = hw.tflops.get(precision, hw.tflops.get("bf16", 0.0)) * 1e12
        return self.flops / (self.gpus * peak * mfu) / 3600 if self.gpus and peak else 0.0


def _total(parts: dict[str, float]) -> dict[str, float]:
    rest = sum(parts.values())
    parts["runtime reserve (assumed)"] = RESERVE_GIB + RESERVE_SHARE * rest
    parts["total"] = sum(parts.values())
    return parts


def precision_of(cfg: Config) -> str:
    precision = cfg.deepspeed.precision
    if precision == "auto":
        return "bf16" if cfg.train.use_gpu else "fp32"
    return precision


def micro_batch(cfg: Config) -> int:
    """Queries one worker encodes per micro-step."""
    return -(-cfg.train.global_batch_size // (cfg.train.grad_accum * max_workers(cfg.train)))


def sequences_per_micro_step(cfg: Config) -> int:
    """Prompts through the LLM with gradients per micro-step on one worker: the queries, and
    with an entity encoder also the encoded candidates (answers and sampled negatives)."""
    micro = micro_batch(cfg)
    if cfg.model.entity_repr == "table":
        return micro
    return 2 * micro + cfg.train.num_negatives + cfg.train.hard_negatives


def model_states(meta: MetaModel, cfg: Config, zero: int, workers: int) -> dict[str, float]:
    """Weights, gradients and optimizer states per worker (GiB) under ZeRO ``zero``."""
    w = 4 if precision_of(cfg) == "fp32" else 2
    trainable = sum(meta.trainable.values())
    frozen = sum(meta.params.values()) - trainable
    mixed = w == 2
    per = workers if zero >= 1 else 1
    states = (4 if mixed else 0) + 8  # fp32 master copy (mixed precision) + Adam m, v
    parts = {"weights (frozen)": w * frozen / (workers if zero == 3 else 1),
             "weights (trained)": w * trainable / (workers if zero == 3 else 1)}
    parts["buffers"] = buffer_bytes(meta)
    if zero == 3:
        parts["ZeRO-3 gathered layer"] = 4 * meta.largest_layer  # params + grads, 16-bit
    grads_per = workers if zero >= 2 else 1
    parts["gradients"] = (w + (4 if mixed else 0)) * trainable / grads_per
    parts["optimizer states"] = states * trainable / per
    if zero >= 2:
        parts["reduce buckets"] = 2 * BUCKET_ELEMENTS * w
    if cfg.deepspeed.offload_optimizer:  # fp32 master, moments and gradients on the CPU
        parts["optimizer states"] = 0.0
        parts["gradients"] = w * trainable / grads_per
    if cfg.deepspeed.offload_params and zero == 3:  # only the gathered layers on the GPU
        parts["weights (frozen)"] = parts["weights (trained)"] = 0.0
    return {k: v / GIB for k, v in parts.items()}


def buffer_bytes(meta: MetaModel) -> int:
    """The model's buffers (the fp32 entity cache, the entities' visual summaries, rotary
    tables): on every GPU, never partitioned."""
    return sum(b.numel() * b.element_size() for b in meta.elmm.buffers())


def train_memory(meta: MetaModel, cfg: Config, zero: int, checkpointing: bool,
                 activations: dict[str, int], counts: Counts) -> dict[str, float]:
    workers = max_workers(cfg.train)
    parts = model_states(meta, cfg, zero, workers)
    seqs = sequences_per_micro_step(cfg)
    layers = len(meta.elmm.language_model.layers)
    if checkpointing:  # layer inputs kept, one layer's activations live in its recompute
        llm = activations["llm_layer_inputs"] + activations["llm"] / layers
    else:
        llm = activations["llm"]
    parts["activations: LLM"] = llm / GIB
    parts["activations: MVTC + projector"] = activations["mvtc"] / GIB
    vision = meta.elmm.backbone.config.vision_config.hidden_size
    images = max(cfg.images.max_images_per_entity, 1)
    parts["input features (fp32)"] = seqs * images * meta.patch_tokens * vision * 4 / GIB
    parts["entity scores (fp32)"] = micro_batch(cfg) * counts.entities * 4 * 3 / GIB
    return _total(parts)


def inference_memory(meta: MetaModel, cfg: Config, batch: int, with_llm: bool = True,
                     weight_bytes: int | None = None) -> dict[str, float]:
    """Weights + the live tensors of one no-grad batch (an estimate: the features in fp32
    and in the model's dtype, two patch-token-wide MVTC intermediates, a few LLM-wide ones)."""
    e = weight_bytes or meta.elmm.readout.weight.element_size()
    vision_cfg = meta.elmm.backbone.config.vision_config
    text = meta.elmm.backbone.config.text_config
    patches = max(cfg.images.max_images_per_entity, 1) * meta.patch_tokens
    parts: dict[str, float] = {}
    if with_llm:
        parts["weights"] = e * sum(meta.params.values()) / GIB
        parts["buffers"] = buffer_bytes(meta) / GIB
        parts["input features (fp32 + model dtype)"] = (
            batch * patches * vision_cfg.hidden_size * (4 + e) / GIB)
        parts["MVTC intermediates (estimate)"] = (
            2 * batch * patches * vision_cfg.hidden_size * e / GIB)
        parts["LLM intermediates (estimate)"] = (
            batch * meta.prompt_tokens * (4 * text.hidden_size + 2 * text.intermediate_size)
            * e / GIB)
    else:  # the vision tower alone, all hidden states kept (output_hidden_states)
        tokens = (vision_cfg.image_size // vision_cfg.patch_size) ** 2 + 1
        parts["weights"] = e * meta.params["vision_tower"] / GIB
        parts["hidden states (all layers)"] = (
            batch * tokens * vision_cfg.hidden_size * e * (vision_cfg.num_hidden_layers + 1) / GIB)
        parts["layer intermediates (estimate)"] = (
            batch * tokens * (3 * vision_cfg.hidden_size + vision_cfg.intermediate_size) * e / GIB)
        parts["pixels (fp32)"] = batch * 3 * vision_cfg.image_size**2 * 4 / GIB
    return _total(parts)


def sequence_flops(meta: MetaModel, cfg: Config, length: int) -> tuple[float, float]:
    """Forward FLOPs of one prompt: (LLM + readout, MVTC + projector)."""
    lm = meta.elmm.language_model
    text = meta.elmm.backbone.config.text_config
    layers = len(lm.layers)
    llm = 2 * length * linear_macs(lm) + 2 * length * length * text.hidden_size * layers
    llm += 2 * linear_macs(meta.elmm.readout)
    patches = max(cfg.images.max_images_per_entity, 1) * meta.patch_tokens
    mvtc_model = meta.elmm.mvtc
    queries = cfg.mvtc.n_visual + cfg.mvtc.n_text
    visual = 0.0
    if mvtc_model is not None and queries:
        # The pooling attentions map their queries into the feature space (counted with
        # the MVTC's linear layers, once per query) instead of projecting the patches: per
        # patch and query, a logit per head over C + 1 values and one weighted value.
        heads = mvtc_model.visual_pool.attention.heads if mvtc_model.n_visual else \
            mvtc_model.text_pool.attention.heads
        width = mvtc_model.feature_dim
        visual = 2 * queries * linear_macs(mvtc_model)
        visual += 2 * queries * patches * (heads * (width + 1) + width)
        visual += 2 * queries * linear_macs(meta.elmm.projector)
    elif cfg.model.uncompressed:
        visual = 2 * patches * linear_macs(meta.elmm.projector)
    return float(llm), float(visual)


def vision_flops_per_image(meta: MetaModel) -> float:
    v = meta.elmm.backbone.config.vision_config
    tokens = (v.image_size // v.patch_size) ** 2 + 1
    tower = meta.elmm.backbone.model.vision_tower
    patch_embed = 2 * 3 * v.patch_size**2 * v.hidden_size * (tokens - 1)
    attention = 4 * tokens * tokens * v.hidden_size * v.num_hidden_layers
    return float(2 * tokens * linear_macs(tower) + attention + patch_embed)


def train_steps(cfg: Config, counts: Counts) -> int:
    queries = counts.train * (2 if cfg.train.both_directions else 1)
    steps = cfg.train.epochs * math.ceil(queries / cfg.train.global_batch_size)
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


def stages(meta: MetaModel, cfg: Config, counts: Counts, hw: Hardware) -> tuple[list[Stage], dict]:
    """Every GPU stage of ``cfg`` (extract, entity init, train with ZeRO-2 and ZeRO-3, eval,
    prune) and the training figures the JSON reports."""
    workers = max_workers(cfg.train)
    seqs = sequences_per_micro_step(cfg)
    acts = activation_bytes(meta, cfg, seqs, meta.prompt_tokens)
    llm, visual = sequence_flops(meta, cfg, meta.prompt_tokens)
    entity_len = meta.prompt_tokens - cfg.model.max_text_tokens - 1
    llm_entity, visual_entity = sequence_flops(meta, cfg, entity_len)
    per_step_seqs = seqs * workers * cfg.train.grad_accum
    # backward: the activations' gradients through every layer (LoRA sits in all of them),
    # weight gradients only of what trains (LoRA: negligible; MVTC + projector: full)
    step = per_step_seqs * (2 * llm + 3 * visual)
    step_ckpt = per_step_seqs * (3 * llm + 3 * visual)
    steps = train_steps(cfg, counts)
    encoder = cfg.model.entity_repr != "table"
    rounds = (steps // cfg.train.eval_every if cfg.train.eval_every else cfg.train.epochs)
    val_queries = 2 * min(cfg.train.val_max_queries or counts.valid, counts.valid)
    encode_all = counts.entities * (llm_entity + visual_entity) if encoder else 0.0
    validation = rounds * (val_queries * (llm + visual) + encode_all)
    data_gpus = cfg.ray.data_actors if cfg.ray.data_actor_gpus > 0 else 0
    eval_workers = cfg.eval.workers if cfg.eval.workers is not None else workers
    model_bytes = meta.elmm.readout.weight.element_size()
    out: list[Stage] = []
    if not cfg.dataset.visual_embeddings.path:
        out.append(Stage("extract", data_gpus, inference_memory(
            meta, cfg, cfg.ray.data_batch_size, with_llm=False),
            counts.images * vision_flops_per_image(meta),
            "vision tower only, a batch of ray.data_batch_size images"))
    if cfg.model.entity_repr != "encoder":
        out.append(Stage("entity_init", data_gpus, inference_memory(
            meta, cfg, cfg.ray.data_batch_size), counts.entities * (llm_entity + visual_entity),
            "whole model, a batch of ray.data_batch_size entities"))
    for zero in sorted({cfg.deepspeed.zero_stage, 2, 3}):  # the configured one, 2 and 3
        for ckpt in (False, True):
            name = f"train ZeRO-{zero}" + (" + grad ckpt" if ckpt else "")
            flops = steps * (step_ckpt if ckpt else step) + validation
            out.append(Stage(name, workers, train_memory(meta, cfg, zero, ckpt, acts, counts),
                             flops, f"micro-batch {micro_batch(cfg)} queries ({seqs} sequences)"
                             f" x {meta.prompt_tokens} tokens"))
    test_queries = 2 * counts.test if cfg.eval.max_queries is None else 2 * min(
        cfg.eval.max_queries, counts.test)
    out.append(Stage("eval", max(eval_workers, 1), inference_memory(
        meta, cfg, cfg.eval.batch_size, weight_bytes=model_bytes),
        test_queries * (llm + visual) + encode_all, "a batch of eval.batch_size queries"))
    if cfg.prune.method != "none":
        importance = cfg.prune.method == "knowledge"
        mem = inference_memory(meta, cfg, micro_batch(cfg))
        if importance:  # gradients of every LLM weight for the importance scores
            mem["LLM weight gradients"] = model_bytes * meta.params["llm"] / GIB
            mem["total"] += mem["LLM weight gradients"]
        fine_tune = cfg.prune.steps * cfg.prune.finetune_steps * step
        calib = cfg.prune.steps * cfg.prune.calib_samples * (llm + visual) * (3 if importance
                                                                              else 1)
        out.append(Stage("prune", 1, mem, calib + fine_tune,
                         "importance / calibration on one GPU; fine-tuning steps as train"))
    figures = {"micro_batch": micro_batch(cfg), "sequences_per_micro_step": seqs,
               "prompt_tokens": meta.prompt_tokens, "train_steps": steps,
               "train_flops_per_step": step, "train_flops_per_step_grad_ckpt": step_ckpt,
               "tokens_per_step": per_step_seqs * meta.prompt_tokens,
               "activations_gib": {k: v / GIB for k, v in acts.items()}}
    return out, figures

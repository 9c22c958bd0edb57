"""The configured ELMM built on the meta device from a checkpoint's ``config.json`` alone (no
weights, nothing downloaded): its parameters by group, its shapes checked end to end, and the
activations autograd keeps, measured on meta tensors at the planned batch and token counts.

``model.backbone`` resolves to the ``config.json`` (and tokenizer facts) shipped in
``elmm_ray/plan/checkpoints/`` for the LLaVA-1.5 hub ids, to a local checkpoint directory's
own files, to a hub id's files already in the local HF cache, or to the tiny sizes of the
config."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration

from elmm_ray.config import Config
from elmm_ray.models.backbone import num_image_tokens, resolve_dtype, tiny_llava_config
from elmm_ray.models.build import assemble_elmm
from elmm_ray.models.elmm import ELMM
from elmm_ray.models.lora import apply_lora, set_trainable
from elmm_ray.models.tokenizer import (
    IMAGE_TOKEN,
    INVERSE_TOKEN,
    PAD_TOKEN,
    PROMPT_TOKENS,
    READOUT_TOKEN,
    SPECIAL_TOKENS,
)

CHECKPOINTS = Path(__file__).parent / "checkpoints"
SHIPPED = {"llava-hf/llava-1.5-7b-hf": "llava-1.5-7b-hf",
           "llava-hf/llava-1.5-13b-hf": "llava-1.5-13b-hf"}
TOKENIZER_FACTS = "tokenizer_facts.json"
GROUPS = ("lora", "mvtc", "projector", "readout", "entity_table", "learned_tokens",
          "visual_input", "llm", "vision_tower")


class PlanError(ValueError):
    """The configured model cannot be built: the message names the mismatch."""


class CheckpointUnavailable(PlanError):
    """A hub id whose config.json is neither shipped nor in the local HF cache: no plan
    offline (the run itself may still fetch it)."""


@dataclasses.dataclass
class MetaModel:
    """The ELMM of a config on the meta device and what the plan reads from it."""

    elmm: ELMM
    source: str  # where config.json came from
    params: dict[str, int]  # by group (GROUPS), trainable or frozen
    trainable: dict[str, int]
    lora_targets: list[str]
    checks: list[str]  # the shape checks that passed, in words
    largest_layer: int  # parameters of the largest decoder layer (ZeRO-3 gathers)
    prompt_tokens: int  # the longest prompt of a query
    patch_tokens: int  # patch tokens per image after pooling
    vocab: int


def _facts_for_tiny(cfg: Config) -> dict:
    """The trained BPE of the tiny backbone: the special tokens take ids 0..6."""
    ids = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    return {"length": cfg.model.vocab_size, "pad_token_id": ids[PAD_TOKEN], "added_tokens": ids}


def _local_tokenizer_facts(directory: Path) -> dict | None:
    if (directory / TOKENIZER_FACTS).is_file():
        return json.loads((directory / TOKENIZER_FACTS).read_text())
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from elmm_ray.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(directory)
    added = {t: tokenizer.convert_tokens_to_ids(t) for t in (*PROMPT_TOKENS, PAD_TOKEN)
             if t in tokenizer.get_vocab()}
    return {"length": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "added_tokens": added}


def resolve_checkpoint(cfg: Config) -> tuple[LlavaConfig, dict | None, str]:
    """``(LlavaConfig, tokenizer facts or None, where they came from)`` of ``model.backbone``,
    offline."""
    name = cfg.model.backbone
    if name == "tiny":
        facts = _facts_for_tiny(cfg)
        config = tiny_llava_config(**{k: getattr(cfg.model, k) for k in (
            "vision_hidden", "vision_layers", "vision_heads", "image_size", "patch_size",
            "llm_hidden", "llm_layers", "llm_heads", "llm_kv_heads", "llm_intermediate",
            "vocab_size")}, image_token_id=facts["added_tokens"][IMAGE_TOKEN],
            pad_token_id=facts["pad_token_id"])
        return config, facts, "tiny (sizes of model.*)"
    path = Path(name).expanduser()
    if name in SHIPPED:
        path, where = CHECKPOINTS / SHIPPED[name], f"{name} (config.json shipped in the repo)"
    elif path.is_dir():
        where = f"{path} (local checkpoint)"
    else:
        path, where = _cached_hub_dir(name), f"{name} (local HF cache)"
    if not (path / "config.json").is_file():
        raise PlanError(f"`model.backbone` = {name!r}: {path} has no config.json; give a "
                        "checkpoint directory, or one of the hub ids planned offline: "
                        f"{', '.join(SHIPPED)}")
    config = LlavaConfig.from_pretrained(str(path))
    return config, _local_tokenizer_facts(path), where


def _cached_hub_dir(name: str) -> Path:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id: the caller names the problem
        found = None
    if not isinstance(found, str):
        raise CheckpointUnavailable(
            f"`model.backbone` = {name!r} is neither a local directory nor a hub id whose "
            "config.json is shipped or in the local HF cache (nothing is downloaded); "
            f"shipped: {', '.join(SHIPPED)}")
    return Path(found).parent


def _token_ids(facts: dict | None, vocab_rows: int) -> tuple[dict[str, int], int]:
    """The prompt tokens' ids after :func:`prepare_tokenizer` and the tokenizer's length."""
    if facts is None:  # no tokenizer files: assume they are added after the checkpoint's rows
        facts = {"length": vocab_rows, "pad_token_id": None, "added_tokens": {}}
    ids, length = dict(facts["added_tokens"]), int(facts["length"])
    for token in PROMPT_TOKENS:
        if token not in ids:
            ids[token], length = length, length + 1
    if facts.get("pad_token_id") is None and PAD_TOKEN not in ids:
        ids[PAD_TOKEN], length = length, length + 1
    return ids, length


def prompt_length(cfg: Config, patch_tokens: int) -> int:
    """The longest query prompt: ``<s>`` + entity text + visual tokens + relation text +
    ``<inv>`` + ``<readout>`` (:class:`elmm_ray.data.collate.QueryCollator`)."""
    images = max(cfg.images.max_images_per_entity, 1)
    visual = (images * patch_tokens if cfg.model.uncompressed
              else cfg.mvtc.n_visual + cfg.mvtc.n_text)
    return 1 + cfg.model.max_text_tokens + visual + cfg.model.max_text_tokens + 2


def _group(name: str) -> str:
    if ".lora_" in name:
        return "lora"
    for group in ("mvtc", "readout", "entity_table", "learned_tokens", "visual_input"):
        if name.startswith(group + "."):
            return group
    if "multi_modal_projector" in name:
        return "projector"
    return "vision_tower" if "vision_tower" in name else "llm"


def build_meta(cfg: Config, num_entities: int) -> MetaModel:
    """The ELMM of ``cfg`` on the meta device, with LoRA when enabled; raises
    :class:`PlanError` naming the first mismatch."""
    config, facts, where = resolve_checkpoint(cfg)
    vision, text = config.vision_config, config.text_config
    checks = _check_config(cfg, config)
    ids, length = _token_ids(facts, text.vocab_size)
    checks += _check_tokens(config, facts, ids)
    dtype = resolve_dtype(cfg.model.dtype)
    with torch.device("meta"):
        backbone = LlavaForConditionalGeneration(config).to(dtype)
        if length > backbone.get_input_embeddings().num_embeddings:
            backbone.resize_token_embeddings(length)
            checks.append(f"embeddings resized to {length} rows for the added tokens")
        elmm = assemble_elmm(cfg, backbone, num_entities=num_entities,
                             readout_id=ids[READOUT_TOKEN], inverse_id=ids[INVERSE_TOKEN])
        targets: list[str] = []
        if cfg.lora.enabled:
            try:
                targets = apply_lora(elmm, r=cfg.lora.r, alpha=cfg.lora.alpha,
                                     dropout=cfg.lora.dropout, target_regex=cfg.lora.target_regex)
            except ValueError as err:
                raise PlanError(f"`lora.target_regex`: {err}") from None
            kinds = sorted({t.rsplit(".", 1)[-1] for t in targets})
            checks.append(f"LoRA on {len(targets)} modules ({', '.join(kinds)}) of the LLM")
        else:
            set_trainable(elmm, train_llm=True)
    patch = num_image_tokens(vision.image_size, vision.patch_size, cfg.model.feature_pool)
    checks += check_shapes(elmm, cfg, patch)
    params = dict.fromkeys(GROUPS, 0)
    trainable = dict.fromkeys(GROUPS, 0)
    for name, p in elmm.named_parameters():
        params[_group(name)] += p.numel()
        trainable[_group(name)] += p.numel() if p.requires_grad else 0
    layers = elmm.language_model.layers
    largest = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    return MetaModel(elmm, where, params, trainable, targets,
                     checks, largest, prompt_length(cfg, patch), patch, length)


def _check_config(cfg: Config, config: LlavaConfig) -> list[str]:
    vision, text = config.vision_config, config.text_config
    layer, depth = config.vision_feature_layer, vision.num_hidden_layers
    if not isinstance(layer, int):
        raise PlanError(f"vision_feature_layer {layer} of the checkpoint concatenates layers; "
                        "only one layer is supported")
    if not -(depth + 1) <= cfg.model.vision_feature_layer <= depth:
        raise PlanError(f"`model.vision_feature_layer` = {cfg.model.vision_feature_layer} is "
                        f"outside the {depth}-layer vision tower (hidden states "
                        f"-{depth + 1}..{depth})")
    grid = vision.image_size // vision.patch_size
    if vision.image_size % vision.patch_size or grid % cfg.model.feature_pool:
        raise PlanError(f"`model.feature_pool` = {cfg.model.feature_pool} does not divide the "
                        f"{grid}x{grid} patch grid ({vision.image_size} px / {vision.patch_size} "
                        "px patches)")
    width = cfg.mvtc.dim or vision.hidden_size
    for what, size in (("`mvtc.dim` (or the vision width)", width),
                       ("the vision width", vision.hidden_size)):
        if size % cfg.mvtc.heads:
            raise PlanError(f"{what} {size} is not divisible by `mvtc.heads` = {cfg.mvtc.heads}")
    if text.hidden_size % text.num_attention_heads:
        raise PlanError(f"LLM hidden {text.hidden_size} is not divisible by its "
                        f"{text.num_attention_heads} heads")
    return [f"vision_feature_layer {cfg.model.vision_feature_layer} of {depth} layers; "
            f"{grid}x{grid} patches / pool {cfg.model.feature_pool}"]


def _check_tokens(config: LlavaConfig, facts: dict | None, ids: dict[str, int]) -> list[str]:
    if facts is None:
        return ["no tokenizer files: the prompt tokens are assumed appended after the "
                "checkpoint's rows"]
    image = getattr(config, "image_token_id", None)
    if image is not None and ids.get(IMAGE_TOKEN, image) != image:
        raise PlanError(f"the tokenizer's <image> id {ids[IMAGE_TOKEN]} differs from the "
                        f"checkpoint's image_token_id {image}")
    return [f"special tokens: <image> {ids.get(IMAGE_TOKEN)}, <readout> {ids[READOUT_TOKEN]}, "
            f"<inv> {ids[INVERSE_TOKEN]}, <pad> {ids.get(PAD_TOKEN, facts.get('pad_token_id'))}"]


def check_shapes(elmm: ELMM, cfg: Config, patch_tokens: int) -> list[str]:
    """Meta tensors through vision features -> MVTC -> projector -> LLM -> readout; a
    :class:`PlanError` names the step whose shapes do not fit."""
    vision = elmm.backbone.config.vision_config.hidden_size
    hidden = elmm.backbone.config.text_config.hidden_size
    images = max(cfg.images.max_images_per_entity, 1)
    trace = [f"features (1, {images} x {patch_tokens}, {vision})"]
    with torch.device("meta"), torch.no_grad():
        try:
            tokens = torch.empty(1, images * patch_tokens, vision, dtype=elmm.readout.weight.dtype)
            if elmm.mvtc is not None:
                text = torch.empty(1, cfg.model.max_text_tokens, hidden, dtype=tokens.dtype)
                tokens, _ = elmm.mvtc(tokens, torch.ones(1, tokens.shape[1], dtype=torch.bool),
                                      text, torch.ones(1, text.shape[1], dtype=torch.bool))
                trace.append(f"MVTC {tuple(tokens.shape)}")
            tokens = elmm.projector(tokens)
            trace.append(f"projector {tuple(tokens.shape)}")
            out = elmm.language_model(inputs_embeds=tokens).last_hidden_state
            trace.append(f"LLM {tuple(out.shape)}")
            vector = elmm.readout(out[:, -1])
            trace.append(f"readout {tuple(vector.shape)}")
        except RuntimeError as err:
            raise PlanError(f"shapes do not fit after {' -> '.join(trace)}: {err}") from None
    if vector.shape[-1] != elmm.entity_table.weight.shape[1]:
        raise PlanError(f"query vectors of width {vector.shape[-1]} cannot be scored against "
                        f"entity vectors of width {elmm.entity_table.weight.shape[1]}")
    return [" -> ".join(trace)]


class _SavedLikeFlash(torch.autograd.Function):
    """Attention that keeps for backward what flash / memory-efficient kernels keep:
    q, k, v, the output and the log-sum-exp (no seq x seq matrix)."""

    @staticmethod
    def forward(ctx, query, key, value):  # (B, heads, L, d)
        out = torch.empty_like(query)
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the plan only counts what forward keeps
        raise NotImplementedError


def _flash_like(module, query, key, value, attention_mask, **kwargs):
    return _SavedLikeFlash.apply(query, key, value).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _flash_attention() -> Iterator[None]:
    from transformers.modeling_utils import AttentionInterface

    mapping = AttentionInterface._global_mapping
    previous = mapping["sdpa"]
    mapping["sdpa"] = _flash_like
    try:
        yield
    finally:
        mapping["sdpa"] = previous


def saved_bytes(run: Callable[[], object], exclude: list[torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves while ``run()`` builds its graph (storages counted
    once; ``exclude``: parameters, which frozen layers save to back-propagate)."""
    skip = {t.untyped_storage()._cdata for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            seen[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _flash_attention():
        run()
    return sum(seen.values())


def activation_bytes(meta: MetaModel, cfg: Config, sequences: int, length: int) -> dict[str, int]:
    """Activations autograd keeps for one micro-step of ``sequences`` prompts of ``length``
    tokens (each with its images' patch features through MVTC): by part, on meta tensors."""
    elmm = meta.elmm
    params = list(elmm.parameters())
    vision = elmm.backbone.config.vision_config.hidden_size
    hidden = elmm.backbone.config.text_config.hidden_size
    dtype = elmm.readout.weight.dtype
    images = max(cfg.images.max_images_per_entity, 1)
    out: dict[str, int] = {}
    with torch.device("meta"):
        elmm.train()
        patches = torch.empty(sequences, images * meta.patch_tokens, vision, dtype=dtype)
        text = torch.empty(sequences, cfg.model.max_text_tokens, hidden, dtype=dtype,
                           requires_grad=True)
        mask = torch.ones(sequences, patches.shape[1], dtype=torch.bool)
        text_mask = torch.ones(sequences, text.shape[1], dtype=torch.bool)
        if elmm.mvtc is not None:
            out["mvtc"] = saved_bytes(lambda: elmm.projector(elmm.mvtc(
                patches, mask, text, text_mask)[0]), params)
        else:
            out["mvtc"] = saved_bytes(lambda: elmm.projector(patches.requires_grad_()), params)
        embeds = torch.empty(sequences, length, hidden, dtype=dtype, requires_grad=True)
        out["llm"] = saved_bytes(lambda: elmm.readout(
            elmm.language_model(inputs_embeds=embeds).last_hidden_state[:, -1]), params)
        out["llm_layer_inputs"] = (len(elmm.language_model.layers) * sequences * length
                                   * hidden * dtype.itemsize)
        elmm.eval()
    return out


def lora_target_names(meta: MetaModel) -> list[str]:
    """The distinct module names (last part) LoRA adapts, e.g. ``q_proj``."""
    return sorted({re.sub(r".*\.", "", t) for t in meta.lora_targets})


def linear_macs(module: nn.Module) -> int:
    """Multiply-accumulates of one token through every ``nn.Linear`` of ``module``."""
    return sum(m.in_features * m.out_features for m in module.modules()
               if isinstance(m, nn.Linear))

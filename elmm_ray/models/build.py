"""Builders: the only place where a :class:`Config` turns into a tokenizer and an ELMM."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

import torch
from transformers import PreTrainedTokenizerBase

from elmm_ray.config import Config
from elmm_ray.models.backbone import build_tiny_llava, resolve_dtype
from elmm_ray.models.elmm import ELMM
from elmm_ray.models.mvtc import MVTC
from elmm_ray.models.tokenizer import (
    IMAGE_TOKEN,
    INVERSE_TOKEN,
    READOUT_TOKEN,
    load_tokenizer,
    prepare_tokenizer,
    token_id,
    train_tokenizer,
)

TINY = "tiny"
_FORBIDDEN: list[str] = []  # why this process may not build the model (a guard, see below)


@contextlib.contextmanager
def forbid_model_build(why: str):
    """While active, :func:`build_elmm` in this process raises: e.g. a driver that only
    orchestrates (its model work belongs on Ray workers, which are other processes)."""
    _FORBIDDEN.append(why)
    try:
        yield
    finally:
        _FORBIDDEN.pop()


def build_tokenizer(cfg: Config, texts: Iterable[str]) -> PreTrainedTokenizerBase:
    """A BPE trained on ``texts`` for the tiny backbone, else the checkpoint's own tokenizer
    with the prompt's special tokens added (``texts`` is then unused)."""
    if cfg.model.backbone == TINY:
        return train_tokenizer(texts, cfg.model.vocab_size)
    tokenizer = load_tokenizer(cfg.model.backbone,
                               trust_remote_code=cfg.model.trust_remote_code)
    prepare_tokenizer(tokenizer)
    return tokenizer


def tiny_backbone(cfg: Config, tokenizer: PreTrainedTokenizerBase):
    """The random-init tiny LLaVA of ``cfg`` (seeded by ``cfg.seed``: every process builds
    the same weights), the first thing :func:`build_elmm` builds. Not guarded: creating the
    tiny backbone's weights file once is not running the model."""
    model = cfg.model
    return build_tiny_llava(
        vision_hidden=model.vision_hidden, vision_layers=model.vision_layers,
        vision_heads=model.vision_heads, image_size=model.image_size,
        patch_size=model.patch_size, llm_hidden=model.llm_hidden, llm_layers=model.llm_layers,
        llm_heads=model.llm_heads, llm_kv_heads=model.llm_kv_heads,
        llm_intermediate=model.llm_intermediate,
        vocab_size=max(model.vocab_size, len(tokenizer)),
        image_token_id=token_id(tokenizer, IMAGE_TOKEN),
        pad_token_id=int(tokenizer.pad_token_id), seed=cfg.seed,
    ).to(resolve_dtype(model.dtype))


def composed_backbone(cfg: Config, tokenizer: PreTrainedTokenizerBase):
    """``model.vision_tower`` joined to the configured LLM (the seeded tiny one, or the
    LLM of checkpoint ``model.backbone``) with a fresh projector seeded by ``cfg.seed``, and
    the tower's processor config (saved with it: :func:`elmm_ray.models.towers.save_composed`)."""
    from elmm_ray.models.towers import (
        compose_llava,
        decoder_of,
        load_tower,
        tower_family,
        tower_processor_config,
    )

    model = cfg.model
    tower = load_tower(model.vision_tower, model.dtype,
                       trust_remote_code=model.trust_remote_code)
    if model.backbone == TINY:
        tiny = tiny_backbone(cfg, tokenizer)
        language_model, lm_head = tiny.model.language_model, tiny.lm_head
    else:
        language_model, lm_head = decoder_of(model.backbone, model.dtype,
                                             trust_remote_code=model.trust_remote_code)
    composed = compose_llava(tower, language_model, lm_head,
                             image_token_id=token_id(tokenizer, IMAGE_TOKEN),
                             vision_feature_layer=model.vision_feature_layer, seed=cfg.seed)
    family = tower_family(model.vision_tower, trust_remote_code=model.trust_remote_code)
    processor = tower_processor_config(model.vision_tower, family,
                                       int(tower.config.image_size))
    return composed, processor


def build_elmm(cfg: Config, *, num_entities: int, tokenizer: PreTrainedTokenizerBase,
               feature_width: int | None = None) -> ELMM:
    """The ELMM of ``cfg`` (without LoRA: see :func:`elmm_ray.models.lora.apply_lora`).

    ``feature_width``: the width of the visual features it will read (the feature store's);
    None or the vision tower's width: features go straight into MVTC / the projector, else
    through a trainable linear map (precomputed embeddings of another encoder)."""
    if not _FORBIDDEN and os.environ.get("ELMM_ORCHESTRATOR_PID") == str(os.getpid()):
        # a whole command's guard (tests): set for the driver, inherited by its workers,
        # whose process ids differ
        _FORBIDDEN.append("this process is the orchestrator (ELMM_ORCHESTRATOR_PID)")
    if _FORBIDDEN:
        raise RuntimeError(f"the model was built in a process that must not build it: "
                           f"{_FORBIDDEN[-1]}")
    model = cfg.model
    dtype = resolve_dtype(model.dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if model.backbone == TINY:
            backbone = tiny_backbone(cfg, tokenizer)
        else:
            from elmm_ray.models.pruned import load_any_backbone

            backbone = load_any_backbone(  # plain or pruned
                model.backbone, dtype, trust_remote_code=model.trust_remote_code)
            if len(tokenizer) > backbone.get_input_embeddings().num_embeddings:
                backbone.resize_token_embeddings(len(tokenizer))
        readout_id = token_id(tokenizer, READOUT_TOKEN)
        return assemble_elmm(cfg, backbone, num_entities=num_entities, readout_id=readout_id,
                             inverse_id=token_id(tokenizer, INVERSE_TOKEN),
                             feature_width=feature_width)


def assemble_elmm(cfg: Config, backbone, *, num_entities: int, readout_id: int,
                  inverse_id: int, feature_width: int | None = None) -> ELMM:
    """MVTC and the ELMM heads of ``cfg`` around a built ``backbone`` (also on the meta
    device: :mod:`elmm_ray.plan`)."""
    model = cfg.model
    feature_layer = backbone.config.vision_feature_layer
    if not isinstance(feature_layer, int):
        raise ValueError(
            f"backbone {model.backbone!r} concatenates vision layers {feature_layer}; "
            "only a single vision_feature_layer is supported"
        )
    mvtc = None
    if not model.uncompressed:
        mvtc = MVTC(
            feature_dim=backbone.config.vision_config.hidden_size,
            text_dim=backbone.config.text_config.hidden_size,
            n_visual=cfg.mvtc.n_visual,
            n_text=cfg.mvtc.n_text,
            heads=cfg.mvtc.heads,
            dim=cfg.mvtc.dim,
        )
    return ELMM(
        backbone,
        mvtc,
        num_entities=num_entities,
        readout_token_id=readout_id,
        temperature=model.temperature,
        learned_token_ids=(readout_id, inverse_id),
        uncompressed=model.uncompressed,
        entity_image_adapter=(model.entity_image_adapter and reads_images(cfg)
                              and model.entity_repr == "table"),
        entity_repr=model.entity_repr,
        feature_width=feature_width or 0,
    )


def reads_images(cfg: Config) -> bool:
    """Whether the configured model looks at pictures at all (the no-image ablation sets
    both MVTC counts to 0)."""
    return cfg.model.uncompressed or (cfg.mvtc.n_visual + cfg.mvtc.n_text) > 0

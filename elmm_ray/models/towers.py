"""Standalone vision towers (CLIP, SigLIP) joined to a language model, LLaVA-style.

A tower is a Hugging Face vision model directory or hub id: ``CLIPVisionModel`` /
``SiglipVisionModel`` (``vision_model.*`` tensors), or the vision half of a whole ``CLIPModel``
/ ``SiglipModel``. :func:`load_tower` reads it with ``from_pretrained``;
:func:`compose_llava` puts it and a language model into one
``LlavaForConditionalGeneration`` (a fresh projector between them), which is saved with
``save_pretrained`` and from then on loads like any LLaVA checkpoint. :func:`pixel_spec`
gives a checkpoint's (or tower's) own preprocessing from its ``preprocessor_config.json``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration

from elmm_ray.data.pixels import PixelSpec
from elmm_ray.models.backbone import (
    BackboneLoadError,
    has_cls_token,
    num_image_tokens,
    resolve_dtype,
)
from elmm_ray.models.hub import local_first, looks_like_local_path

log = logging.getLogger(__name__)

# model_type of a tower's config.json -> its family (whole CLIP / SigLIP: the vision half)
TOWER_TYPES = {"clip_vision_model": "clip", "clip": "clip",
               "siglip_vision_model": "siglip", "siglip": "siglip"}
PROCESSOR_CONFIG = "preprocessor_config.json"
_DEFAULT_PROCESSOR = {"clip": "CLIPImageProcessor", "siglip": "SiglipImageProcessor"}


def tower_family(source: str, *, trust_remote_code: bool = False) -> str:
    """``clip`` or ``siglip`` for the tower at ``source``; anything else is refused naming
    its model_type and the supported ones."""
    path = Path(source).expanduser()
    if not path.exists() and looks_like_local_path(source):
        raise BackboneLoadError(f"model.vision_tower: directory {path} does not exist; set it "
                                "to a vision model directory or a hub id such as "
                                "openai/clip-vit-large-patch14-336")
    try:
        config = local_first(AutoConfig.from_pretrained, source,
                             trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise BackboneLoadError(f"model.vision_tower {source!r}: no readable config.json "
                                f"({err})") from err
    family = TOWER_TYPES.get(config.model_type)
    if family is None:
        raise BackboneLoadError(
            f"model.vision_tower {source!r} is a {config.model_type!r} model; supported "
            f"vision towers: {', '.join(TOWER_TYPES)} (CLIPVisionModel, SiglipVisionModel, "
            "or a whole CLIPModel / SiglipModel whose vision half is used)")
    return family


def load_tower(source: str, dtype: str | torch.dtype = "float32", *,
               trust_remote_code: bool = False) -> nn.Module:
    """The vision model at ``source`` (a directory or hub id), weights from safetensors only:
    a ``CLIPVisionModel`` or ``SiglipVisionModel`` in eval mode."""
    from transformers import CLIPVisionModel, SiglipVisionModel

    family = tower_family(source, trust_remote_code=trust_remote_code)
    cls = CLIPVisionModel if family == "clip" else SiglipVisionModel
    try:
        tower = local_first(cls.from_pretrained, source, dtype=resolve_dtype(dtype),
                            use_safetensors=True)
    except OSError as err:
        raise BackboneLoadError(f"could not load vision tower {source!r}: {err}") from err
    return tower.eval()


def read_processor_config(source: str) -> dict | None:
    """``preprocessor_config.json`` of a directory or hub id (this node's HF cache, where
    the checkpoint's fetch put it), or None."""
    path = Path(source).expanduser()
    if path.is_dir():
        file = path / PROCESSOR_CONFIG
        return json.loads(file.read_text()) if file.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        # this node's cache only: fetched with the checkpoint (hub.prefetch, load_tower)
        return json.loads(Path(hf_hub_download(source, PROCESSOR_CONFIG,
                                               local_files_only=True)).read_text())
    except Exception as err:  # noqa: BLE001 - a checkpoint without one: the caller decides
        log.info("no %s for %s (%s)", PROCESSOR_CONFIG, source, err)
        return None


def pixel_spec(source: str, vision_config=None, *, trust_remote_code: bool = False
               ) -> PixelSpec:
    """The preprocessing of checkpoint (or tower) ``source``: its processor config, else
    CLIP's at the tower's ``image_size`` (the tiny backbone, a checkpoint without one).
    Refused when it would not give the tower's input size."""
    if vision_config is None:
        config = local_first(AutoConfig.from_pretrained, source,
                             trust_remote_code=trust_remote_code)
        vision_config = getattr(config, "vision_config", None) or config
    size = int(vision_config.image_size)
    processor = read_processor_config(source)
    if processor is None:
        return PixelSpec.clip(size)
    spec = PixelSpec.from_processor_config(processor, f"{source}/{PROCESSOR_CONFIG}")
    if (spec.height, spec.width) != (size, size):
        raise ValueError(f"{source}/{PROCESSOR_CONFIG} makes {spec.height}x{spec.width} "
                         f"pixels but the vision tower takes {size}x{size}")
    return spec


def tower_processor_config(source: str, family: str, image_size: int) -> dict:
    """The tower's own processor config, or its family's defaults at its input size."""
    config = read_processor_config(source)
    if config is not None:
        return config
    log.warning("vision tower %s has no %s: using %s's defaults at %d px", source,
                PROCESSOR_CONFIG, _DEFAULT_PROCESSOR[family], image_size)
    if family == "clip":
        return {"image_processor_type": "CLIPImageProcessor",
                "size": {"shortest_edge": image_size},
                "crop_size": {"height": image_size, "width": image_size}}
    return {"image_processor_type": "SiglipImageProcessor",
            "size": {"height": image_size, "width": image_size}}


def compose_llava(tower: nn.Module, language_model: nn.Module, lm_head: nn.Module, *,
                  image_token_id: int, vision_feature_layer: int, seed: int = 0
                  ) -> LlavaForConditionalGeneration:
    """A LLaVA of ``tower`` (CLIPVisionModel / SiglipVisionModel) and a decoder
    (``language_model``: the base model, ``lm_head``: its output head) with a fresh
    projector seeded by ``seed``. CLS is dropped by the ``default`` feature strategy for CLIP;
    SigLIP has none (``full``)."""
    vision, text = tower.config, language_model.config
    layers = vision.num_hidden_layers
    if not -(layers + 1) <= vision_feature_layer <= layers:
        raise ValueError(f"vision_feature_layer {vision_feature_layer} is outside the "
                         f"{layers}-layer tower (hidden states -{layers + 1}..{layers})")
    config = LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(),
        image_token_id=image_token_id,
        image_seq_length=num_image_tokens(vision.image_size, vision.patch_size),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default" if has_cls_token(vision) else "full")
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = tower
    model.model.language_model = language_model
    model.lm_head = lm_head
    projector = model.model.multi_modal_projector.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in projector.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
    dtype = next(language_model.parameters()).dtype
    return model.to(dtype).eval()


def decoder_of(source: str, dtype: str | torch.dtype = "float32", *,
               trust_remote_code: bool = False) -> tuple[nn.Module, nn.Module]:
    """``(language_model, lm_head)`` of checkpoint ``source``: a LLaVA's own LLM, or a causal
    LM (Llama, Qwen, Mistral, ...) loaded with ``from_pretrained`` from safetensors."""
    from transformers import AutoModelForCausalLM

    from elmm_ray.models.backbone import load_backbone

    config = local_first(AutoConfig.from_pretrained, source,
                         trust_remote_code=trust_remote_code)
    if config.model_type == "llava":
        llava = load_backbone(source, dtype, trust_remote_code=trust_remote_code)
        return llava.model.language_model, llava.lm_head
    try:
        lm = local_first(AutoModelForCausalLM.from_pretrained, source,
                         dtype=resolve_dtype(dtype), use_safetensors=True,
                         trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise BackboneLoadError(f"model.backbone {source!r} ({config.model_type}) is neither a "
                                f"LLaVA nor a causal language model: {err}") from err
    if not (hasattr(lm, "model") and hasattr(lm, "lm_head")):
        raise BackboneLoadError(f"model.backbone {source!r} ({config.model_type}) has no "
                                "`model` + `lm_head` to put under a vision tower")
    return lm.model, lm.lm_head


def save_composed(model: LlavaForConditionalGeneration, processor: dict, out: str | os.PathLike,
                  identity: dict) -> None:
    """``save_pretrained`` plus the tower's processor config and what it was composed of."""
    model.save_pretrained(out)
    Path(out, PROCESSOR_CONFIG).write_text(json.dumps(processor, indent=2) + "\n")
    Path(out, COMPOSED).write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")


COMPOSED = "elmm_composed.json"


def composed_identity(path: str | os.PathLike) -> dict | None:
    """What the composed backbone at ``path`` was built from (None: not a composed one)."""
    file = Path(path, COMPOSED)
    return json.loads(file.read_text()) if file.is_file() else None

"""The Llava backbone: a tiny random one built in code or a pretrained HF checkpoint.

Also the image side that runs outside training: the tower's own preprocessing with PIL +
numpy (no torchvision; :mod:`elmm_ray.data.pixels`) and :func:`encode_images`, the
frozen-vision-tower call that the feature extraction stage runs on every image.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from elmm_ray.data.pixels import CLIP_MEAN, CLIP_STD, PixelSpec, clip_pixels, tower_pixels
from elmm_ray.models.hub import local_first, looks_like_local_path
from elmm_ray.models.tokenizer import warn_remote_code

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class BackboneLoadError(OSError):
    """A checkpoint could not be found or loaded; the message says what to do."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Turn ``"float32"``/``"bfloat16"``/``"float16"`` (or a torch dtype) into a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; choose one of: float32, bfloat16, float16"
        ) from None


def tiny_llava_config(
    *,
    vision_hidden: int,
    vision_layers: int,
    vision_heads: int,
    image_size: int,
    patch_size: int,
    llm_hidden: int,
    llm_layers: int,
    llm_heads: int,
    llm_kv_heads: int,
    llm_intermediate: int,
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int,
) -> LlavaConfig:
    """The config of a tiny Llava (CLIP vision tower + Llama LLM) of the given sizes."""
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=llm_hidden,
        intermediate_size=llm_intermediate,
        num_hidden_layers=llm_layers,
        num_attention_heads=llm_heads,
        num_key_value_heads=llm_kv_heads,
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        max_position_embeddings=4096,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def build_tiny_llava(*, seed: int = 0, **sizes: int) -> LlavaForConditionalGeneration:
    """A randomly initialised Llava of the sizes of :func:`tiny_llava_config`."""
    config = tiny_llava_config(**sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    return model.eval()


def load_backbone(
    name_or_path: str | os.PathLike, dtype: str | torch.dtype = "float32", *,
    trust_remote_code: bool = False,
) -> LlavaForConditionalGeneration:
    """Load a pretrained Llava checkpoint from a local directory or a HF hub id: weights from
    safetensors only (never a pickled ``*.bin``), remote code only when asked."""
    torch_dtype = resolve_dtype(dtype)
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise BackboneLoadError(
                f"backbone directory {path} has no config.json; point model.backbone at a "
                "directory written by save_pretrained (config.json + *.safetensors)"
            )
        source = str(path)
    elif looks_like_local_path(name):
        raise BackboneLoadError(
            f"backbone directory {path} does not exist; set model.backbone to an existing "
            "local checkpoint directory or a hub id such as llava-hf/llava-1.5-7b-hf"
        )
    else:
        source = name
    try:  # a hub id from this node's cache, fetched there once (elmm_ray.models.hub)
        model = local_first(
            LlavaForConditionalGeneration.from_pretrained, source, dtype=torch_dtype,
            use_safetensors=True, trust_remote_code=warn_remote_code(source, trust_remote_code))
    except OSError as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = "HF_HUB_OFFLINE is set, so only the local cache is searched; " if offline else ""
        raise BackboneLoadError(
            f"could not load backbone {source!r}: {error}\n{hint}download it first on a "
            f"machine with network (`hf download {source}`) into the HF cache, "
            "or save it to a directory and set model.backbone to that path"
        ) from error
    return model.eval()


def load_vision_tower(source: str, files: list[str], dtype: str | torch.dtype = "float32",
                      *, trust_remote_code: bool = False) -> nn.Module:
    """Only the vision tower of the LLaVA checkpoint ``source``: built from its
    ``vision_config`` and loaded from the ``vision_tower.`` tensors of its safetensors
    ``files``, never reading the language model's (what feature extraction needs: 0.3 B of
    LLaVA-1.5-7B's 7 B parameters). The same module as :func:`vision_tower_of` gives."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModel

    config = local_first(AutoConfig.from_pretrained, source, trust_remote_code=trust_remote_code)
    vision = config.vision_config
    vision._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    tower = AutoModel.from_config(vision)
    state = {}
    for file in files:
        with safe_open(file, framework="pt") as st:
            for key in st.keys():
                if "vision_tower." in key:
                    state[key.split("vision_tower.", 1)[1]] = st.get_tensor(key)
    try:
        tower.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise BackboneLoadError(f"the vision tower of {source!r} does not load from its "
                                f"safetensors ({err})") from err
    return tower.to(resolve_dtype(dtype)).eval()


def vision_tower_of(model: LlavaForConditionalGeneration) -> nn.Module:
    """The vision tower (CLIP or SigLIP) of a Llava model."""
    return model.model.vision_tower


def has_cls_token(vision_config) -> bool:
    """Whether the tower's hidden states open with a CLS token (CLIP) or hold patch tokens
    only (SigLIP)."""
    return not str(vision_config.model_type).startswith("siglip")


def num_image_tokens(image_size: int, patch_size: int, pool: int = 1) -> int:
    """Patch tokens per image after dropping CLS and ``pool x pool`` pooling."""
    grid = image_size // patch_size
    side = math.ceil(grid / pool)
    return side * side


def preprocess_images(
    images: list[Image.Image],
    image_size: int | PixelSpec,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> torch.Tensor:
    """A tower's preprocessing (a :class:`PixelSpec`; an int: CLIP's at that size, see
    :func:`elmm_ray.data.pixels.clip_pixels`) as a float32 tensor ``(n, 3, H, W)``."""
    if isinstance(image_size, PixelSpec):
        return torch.from_numpy(tower_pixels(images, image_size))
    return torch.from_numpy(clip_pixels(images, image_size, mean, std))


def encode_images(
    vision_tower: nn.Module, pixel_values: torch.Tensor, *, layer: int = -2, pool: int = 1
) -> torch.Tensor:
    """Patch features of the frozen vision tower, float16, shape ``(n, tokens, width)``.

    The hidden state of ``layer`` (LLaVA: -2) with CLS dropped (CLIP; SigLIP has none),
    optionally averaged over
    ``pool x pool`` windows of the patch grid (a ragged last window averages what it has).
    The result stays on the tower's device.
    """
    parameter = next(vision_tower.parameters())
    if pixel_values.shape[0] == 0:
        config = vision_tower.config
        tokens = num_image_tokens(config.image_size, config.patch_size, pool)
        shape = (0, tokens, config.hidden_size)
        return torch.zeros(shape, dtype=torch.float16, device=parameter.device)
    pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
    with torch.no_grad():
        outputs = vision_tower(pixel_values, output_hidden_states=True)
        first = 1 if has_cls_token(vision_tower.config) else 0
        features = outputs.hidden_states[layer][:, first:]
        if pool > 1:
            n, tokens, width = features.shape
            grid = math.isqrt(tokens)
            if grid * grid != tokens:
                raise ValueError(f"cannot pool {tokens} patch tokens: not a square grid")
            grid_features = features.transpose(1, 2).reshape(n, width, grid, grid)
            pooled = F.avg_pool2d(grid_features.float(), pool, stride=pool, ceil_mode=True)
            features = pooled.flatten(2).transpose(1, 2)
    return features.to(torch.float16).contiguous()


def image_feature_shape(model: LlavaForConditionalGeneration, pool: int = 1) -> tuple[int, int]:
    """``(tokens, width)`` of one image's features from :func:`encode_images` on ``model``."""
    vision = model.config.vision_config
    tokens = num_image_tokens(vision.image_size, vision.patch_size, pool)
    return tokens, vision.hidden_size

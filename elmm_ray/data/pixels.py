"""Image preprocessing with PIL and numpy only: Ray Data's decode workers use it without
importing torch or transformers (seconds of start-up per worker).

:class:`PixelSpec` is a vision tower's own preprocessing, read from its
``preprocessor_config.json`` (CLIP: shortest-edge resize + centre crop, CLIP's mean/std;
SigLIP: a plain resize to a square, mean/std 0.5); :func:`tower_pixels` applies it the way
transformers' PIL image processors do (PIL resize of the 8-bit image, rescale in float64,
normalise in float32), so the pixels equal the processor's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
# image processors these settings are read from (the PIL and torchvision variants alike)
SUPPORTED_PROCESSORS = ("CLIPImageProcessor", "SiglipImageProcessor")


@dataclass(frozen=True)
class PixelSpec:
    """How a tower wants its pixels: ``shortest_edge`` resize (then a ``crop`` centre crop)
    or a resize to exactly ``height`` x ``width``; PIL ``resample`` filter; ``rescale``
    factor; per-channel ``mean`` / ``std`` (no normalisation when ``normalize`` is off)."""

    height: int
    width: int
    shortest_edge: int | None = None
    crop: tuple[int, int] | None = None
    resample: int = int(Image.Resampling.BICUBIC)
    rescale: float = 1 / 255
    normalize: bool = True
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    @classmethod
    def clip(cls, image_size: int) -> PixelSpec:
        """CLIP's preprocessing at ``image_size`` (a checkpoint without a processor config)."""
        return cls(image_size, image_size, shortest_edge=image_size,
                   crop=(image_size, image_size))

    @classmethod
    def from_processor_config(cls, config: dict, where: str = "preprocessor_config.json"
                              ) -> PixelSpec:
        """The settings of a CLIP or SigLIP image processor's saved config (a ``ValueError``
        naming ``where`` for another processor or a setting this does not reproduce)."""
        kind = str(config.get("image_processor_type", "")).removesuffix("Pil").removesuffix(
            "Fast")
        if kind not in SUPPORTED_PROCESSORS:
            raise ValueError(f"{where}: image_processor_type {config.get('image_processor_type')!r}"
                             f" is not supported; supported: {', '.join(SUPPORTED_PROCESSORS)}")
        clip = kind == "CLIPImageProcessor"
        for flag in ("do_resize", "do_rescale", "do_convert_rgb"):
            if config.get(flag) is False:
                raise ValueError(f"{where}: {flag}=false is not supported (images of any size "
                                 "must become the tower's input size)")
        if config.get("do_pad"):
            raise ValueError(f"{where}: do_pad=true is not supported")
        size = config.get("size") or ({"shortest_edge": 224} if clip else
                                      {"height": 224, "width": 224})
        if isinstance(size, int):
            size = {"shortest_edge": size} if clip else {"height": size, "width": size}
        crop = None
        if config.get("do_center_crop", clip):
            c = config.get("crop_size") or {"height": 224, "width": 224}
            crop = (int(c), int(c)) if isinstance(c, int) else (int(c["height"]), int(c["width"]))
        if "shortest_edge" in size and set(size) == {"shortest_edge"}:
            edge = int(size["shortest_edge"])
            height, width = crop or (edge, edge)
            shortest = edge
        elif {"height", "width"} <= set(size):
            height, width, shortest = int(size["height"]), int(size["width"]), None
            if crop:
                height, width = crop
        else:
            raise ValueError(f"{where}: size {size} is not supported (shortest_edge, or "
                             "height and width)")
        if crop is None and shortest is not None:
            raise ValueError(f"{where}: a shortest_edge resize without a centre crop leaves "
                             "images of different shapes; set do_center_crop")
        normalize = config.get("do_normalize", True) is not False
        mean = config.get("image_mean") or (CLIP_MEAN if clip else (0.5, 0.5, 0.5))
        std = config.get("image_std") or (CLIP_STD if clip else (0.5, 0.5, 0.5))
        mean = (float(mean),) * 3 if isinstance(mean, (int, float)) else tuple(map(float, mean))
        std = (float(std),) * 3 if isinstance(std, (int, float)) else tuple(map(float, std))
        return cls(height, width, shortest_edge=shortest, crop=crop,
                   resample=int(config.get("resample", 3)),
                   rescale=float(config.get("rescale_factor", 1 / 255)),
                   normalize=normalize, mean=mean, std=std)

    def to_dict(self) -> dict:
        """JSON-safe (tuples as lists): for Ray task arguments and store metadata."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> PixelSpec:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as a viewer shows it: EXIF orientation applied, 16-bit and float scaled to 8 bit,
    transparency composited on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float32)
        low, high = float(array.min()), float(array.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        image = Image.fromarray(((array - low) * scale).astype(np.uint8), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def tower_pixels(images: list[Image.Image], spec: PixelSpec) -> np.ndarray:
    """The tower's preprocessing of ``images``: RGB, resize (+ centre crop), rescale,
    normalise. Returns float32 pixel values of shape ``(n, 3, spec.height, spec.width)``."""
    out = np.empty((len(images), 3, spec.height, spec.width), dtype=np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    for i, image in enumerate(images):
        image = to_rgb(image)
        width, height = image.size
        if spec.shortest_edge is not None:
            edge = spec.shortest_edge
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(edge * long / short)
            size = (edge, new_long) if width <= height else (new_long, edge)
        else:
            size = (spec.width, spec.height)
        image = image.resize(size, resample=Image.Resampling(spec.resample))
        array = np.asarray(image).transpose(2, 0, 1)
        if spec.crop is not None:
            array = _centre_crop(array, *spec.crop)
        pixels = (array.astype(np.float64) * spec.rescale).astype(np.float32)
        out[i] = (pixels - mean) / std if spec.normalize else pixels
    return out


def _centre_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' centre crop of a (C, H, W) array: zero-padded where it is smaller."""
    _, h, w = array.shape
    if h < height or w < width:
        padded = np.zeros((array.shape[0], max(h, height), max(w, width)), dtype=array.dtype)
        top, left = -(-(padded.shape[1] - h) // 2), -(-(padded.shape[2] - w) // 2)
        padded[:, top:top + h, left:left + w] = array
        array, h, w = padded, padded.shape[1], padded.shape[2]
    top, left = (h - height) // 2, (w - width) // 2
    return array[:, top:top + height, left:left + width]


def clip_pixels(
    images: list[Image.Image],
    image_size: int,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> np.ndarray:
    """CLIP preprocessing at ``image_size``: bicubic shortest-side resize, centre crop,
    normalise (:func:`tower_pixels` with :meth:`PixelSpec.clip`)."""
    spec = PixelSpec.clip(image_size)
    return tower_pixels(images, PixelSpec(**{**asdict(spec), "mean": mean, "std": std}))

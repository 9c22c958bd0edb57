"""CLIP image preprocessing with PIL and numpy only: Ray Data's decode workers use it
without importing torch or transformers (seconds of start-up per worker)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


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


def clip_pixels(
    images: list[Image.Image],
    image_size: int,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> np.ndarray:
    """CLIP preprocessing: RGB, bicubic shortest-side resize, centre crop, normalise.

    Returns float32 pixel values of shape ``(n, 3, image_size, image_size)``.
    """
    out = np.empty((len(images), 3, image_size, image_size), dtype=np.float32)
    mean_array = np.asarray(mean, dtype=np.float32)[:, None, None]
    std_array = np.asarray(std, dtype=np.float32)[:, None, None]
    for i, image in enumerate(images):
        image = to_rgb(image)
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_long = max(image_size, int(image_size * long / short))
        size = (image_size, new_long) if width <= height else (new_long, image_size)
        image = image.resize(size, resample=Image.Resampling.BICUBIC)
        width, height = image.size
        left = (width - image_size) // 2
        top = (height - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        out[i] = (pixels - mean_array) / std_array
    return out

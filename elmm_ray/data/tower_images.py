"""The procedural pictures a vision tower is pre-trained on (``tools/pretrain_tower.py``):
scenes of simple coloured shapes on textured backgrounds, drawn with PIL + numpy.

This generator shares no code and no seeds with the synthetic KG's
(:mod:`elmm_ray.data.synth_images`), and its scenes are broader: any hue, 3- to 8-sided
polygons, stars, crosses and ellipses, 1 to 4 copies, plain / lined (any angle) / grid /
dotted / checked backgrounds of any period. A scene is its latent factors
(:func:`sample_scene`); :func:`render` draws one view of it (placement, size, rotation,
texture phase, lighting and noise drawn anew), so two views of a scene are a positive pair
for instance-discrimination learning, and the factors serve only the linear probes of the
model card. No view is ever a labelled example.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("ellipse", "triangle", "square", "pentagon", "hexagon", "octagon", "star", "cross")
TEXTURES = ("plain", "lines", "grid", "dots", "checks")
MAX_COUNT = 4
HUE_BINS = 6  # hue is continuous; the probe reads it in this many bins


def sample_scene(rng: np.random.Generator, *, hue_range: tuple[float, float] = (0.0, 1.0),
                 texture: str | None = None) -> dict:
    """A scene's latent factors. ``hue_range`` / ``texture`` narrow a batch (hard negatives:
    scenes that colour or texture alone cannot tell apart)."""
    low, high = hue_range
    return {
        "hue": float((low + rng.uniform(0, 1) * (high - low)) % 1.0),
        "saturation": float(rng.uniform(0.55, 1.0)), "value": float(rng.uniform(0.55, 0.95)),
        "shape": str(rng.choice(SHAPES)), "count": int(rng.integers(1, MAX_COUNT + 1)),
        "texture": texture or str(rng.choice(TEXTURES)),
        "period": float(rng.uniform(4.0, 11.0)), "angle": float(rng.uniform(0, math.pi)),
        "ground": float(rng.uniform(150, 230)),
    }


def probe_labels(scene: dict) -> dict[str, int]:
    """The factors the model card's linear probes read (hue in bins)."""
    return {"hue": int(scene["hue"] * HUE_BINS) % HUE_BINS,
            "shape": SHAPES.index(scene["shape"]), "count": scene["count"] - 1,
            "texture": TEXTURES.index(scene["texture"])}


def _texture(rng: np.random.Generator, size: int, scene: dict) -> np.ndarray:
    """The background: a tinted grey with the scene's texture a darker shade."""
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = scene["ground"] + rng.uniform(-12, 12) + rng.uniform(-6, 6, size=3)
    kind = scene["texture"]
    if kind != "plain":
        period = scene["period"] * rng.uniform(0.9, 1.1)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        phase = rng.uniform(0, period, size=2)
        angle = scene["angle"] + rng.uniform(-0.1, 0.1)
        u = xx * math.cos(angle) + yy * math.sin(angle) + phase[0]
        v = -xx * math.sin(angle) + yy * math.cos(angle) + phase[1]
        on_u, on_v = (u % period) < period * 0.45, (v % period) < period * 0.45
        mask = {"lines": on_u, "grid": on_u | on_v, "dots": on_u & on_v,
                "checks": on_u ^ on_v}[kind]
        img[mask] -= rng.uniform(50, 90)
    img += rng.normal(0.0, rng.uniform(2, 8), size=img.shape).astype(np.float32)
    return img


def _outline(shape: str, cx: float, cy: float, r: float, turn: float) -> list[tuple]:
    sides = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6, "octagon": 8}
    if shape in sides:
        n = sides[shape]
        return [(cx + r * math.cos(turn + 2 * math.pi * k / n),
                 cy + r * math.sin(turn + 2 * math.pi * k / n)) for k in range(n)]
    if shape == "star":
        return [(cx + r * (1.0 if k % 2 == 0 else 0.42) * math.cos(turn + math.pi * k / 5),
                 cy + r * (1.0 if k % 2 == 0 else 0.42) * math.sin(turn + math.pi * k / 5))
                for k in range(10)]
    arm = 0.3  # cross: a plus of arm half-width 0.3 r, turned
    corners = [(arm, 1), (arm, arm), (1, arm), (1, -arm), (arm, -arm), (arm, -1), (-arm, -1),
               (-arm, -arm), (-1, -arm), (-1, arm), (-arm, arm), (-arm, 1)]
    c, s = math.cos(turn), math.sin(turn)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in corners]


def _centres(rng: np.random.Generator, size: int, count: int) -> tuple[list, float]:
    """``count`` centres far enough apart for one common radius."""
    r = size * rng.uniform(0.2, 0.3) / math.sqrt(count)
    for _ in range(50):
        centres = rng.uniform(r + 1, size - r - 1, size=(count, 2))
        if all(np.hypot(*(centres[i] - centres[k])) >= 2.1 * r
               for i in range(count) for k in range(i + 1, count)):
            return [tuple(c) for c in centres], r
    r = size / (2.4 * count)
    return [(size * (i + 0.5) / count, size / 2) for i in range(count)], r


def render(rng: np.random.Generator, scene: dict, size: int) -> Image.Image:
    """One view of ``scene``: everything not in its factors is drawn from ``rng``."""
    img = Image.fromarray(np.clip(_texture(rng, size, scene), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    centres, r = _centres(rng, size, scene["count"])
    for cx, cy in centres:
        hue = (scene["hue"] + rng.uniform(-0.02, 0.02)) % 1.0
        value = float(np.clip(scene["value"] + rng.uniform(-0.08, 0.08), 0.3, 1.0))
        fill = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, scene["saturation"], value))
        radius = r * rng.uniform(0.9, 1.1)
        if scene["shape"] == "ellipse":
            squash = rng.uniform(0.75, 1.0)
            draw.ellipse((cx - radius, cy - radius * squash, cx + radius, cy + radius * squash),
                         fill=fill, outline=(30, 30, 30))
        else:
            draw.polygon(_outline(scene["shape"], cx, cy, radius, rng.uniform(0, 2 * math.pi)),
                         fill=fill, outline=(30, 30, 30))
    return img

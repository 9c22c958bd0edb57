"""The image files of the synthetic multimodal KG (:mod:`elmm_ray.data.synth`): objects
drawn with their hidden visual attributes (colour, shape, count, background pattern),
value entities showing one attribute value, with per-image variation, and the faulty files
of the reliability tests. Pure PIL + numpy; ``plan`` is the generator's graph plan."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# Random streams of the generator (see elmm_ray.data.synth): pictures and faults draw from
# their own, so that e.g. faults never shift the good pictures.
IMAGE_STREAM, FAULT_STREAM = 2, 3

# Attribute relations take the attributes in this order (easiest to see first).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": ("red", "green", "blue", "yellow", "purple", "cyan"),
    "shape": ("circle", "square", "triangle", "star", "cross"),
    "count": ("one", "two", "three"),
    "pattern": ("plain", "striped", "barred", "dotted"),
}
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 220),
    "yellow": (240, 210, 25),
    "purple": (145, 55, 190),
    "cyan": (25, 190, 205),
}


def _background(rng: np.random.Generator, size: int, pattern: str) -> np.ndarray:
    """A light, noisy, slightly tinted background, with the pattern in a darker grey."""
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = rng.uniform(165, 225) + rng.uniform(-8, 8, size=3)
    if pattern != "plain":
        period = max(4, int(round(size * rng.uniform(0.10, 0.14))))
        width = max(1, int(round(period * rng.uniform(0.35, 0.5))))
        py, px = rng.integers(0, period, size=2)
        rows = ((np.arange(size) + py) % period < width)[:, None]
        cols = ((np.arange(size) + px) % period < width)[None, :]
        mask = {
            "striped": rows & np.ones_like(cols),
            "barred": np.ones_like(rows) & cols,
            "dotted": rows & cols,
        }[pattern]
        img[mask] -= rng.uniform(55, 85)
    img += rng.normal(0.0, rng.uniform(3, 9), size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _polygon(shape: str, cx: float, cy: float, r: float, theta: float) -> list[tuple]:
    """Vertices of a square, triangle, star or cross of circumradius ``r``, turned by theta."""
    if shape == "cross":
        quarter, local = [(0.34, 1.0), (0.34, 0.34), (1.0, 0.34)], []
        for _ in range(4):
            local += quarter
            quarter = [(y, -x) for x, y in quarter]
    else:
        n, radii, start = {
            "square": (4, (1.0,), math.pi / 4),
            "triangle": (3, (1.0,), -math.pi / 2),
            "star": (10, (1.0, 0.45), -math.pi / 2),
        }[shape]
        angles = [start + 2 * math.pi * k / n for k in range(n)]
        local = [
            (radii[k % len(radii)] * math.cos(a), radii[k % len(radii)] * math.sin(a))
            for k, a in enumerate(angles)
        ]
    c, s = math.cos(theta), math.sin(theta)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in local]


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    r: float,
    theta: float,
    fill: tuple[int, int, int],
) -> None:
    outline = (25, 25, 25)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, theta), fill=fill, outline=outline)


def _placements(rng: np.random.Generator, size: int, count: int) -> list[tuple[float, ...]]:
    """``count`` non-overlapping (cx, cy, r) of one common radius."""
    lo, hi = {1: (0.22, 0.32), 2: (0.14, 0.20), 3: (0.11, 0.16)}[count]
    r = size * rng.uniform(lo, hi)
    for _ in range(40):
        centres = rng.uniform(r + 1, size - r - 1, size=(count, 2))
        gaps = [
            np.hypot(*(centres[i] - centres[k])) for i in range(count) for k in range(i + 1, count)
        ]
        if all(g >= 2.15 * r for g in gaps):
            return [(float(x), float(y), r) for x, y in centres]
    r = min(r, size / (2.3 * count))  # fall back to a row across the middle
    return [(size * (i + 0.5) / count, size / 2, r) for i in range(count)]


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> tuple:
    return tuple(
        int(c) for c in np.clip(np.array(rgb) + rng.integers(-amount, amount + 1, 3), 0, 255)
    )


def render_object(rng: np.random.Generator, size: int, attrs: dict[str, int]) -> Image.Image:
    """One picture of an object: its pattern behind ``count`` copies of its coloured shape."""
    img = Image.fromarray(_background(rng, size, ATTRIBUTES["pattern"][attrs["pattern"]]))
    draw = ImageDraw.Draw(img)
    shape = ATTRIBUTES["shape"][attrs["shape"]]
    base = PALETTE[ATTRIBUTES["colour"][attrs["colour"]]]
    for cx, cy, r in _placements(rng, size, attrs["count"] + 1):
        _draw_shape(draw, shape, cx, cy, r, rng.uniform(0, 2 * math.pi), _jitter(rng, base, 18))
    return img


def render_value(rng: np.random.Generator, size: int, attribute: str, v: int) -> Image.Image:
    """One picture of a value entity: the value alone (swatch, grey shape, grey dots, pattern)."""
    if attribute == "colour":
        colour = np.array(_jitter(rng, PALETTE[ATTRIBUTES["colour"][v]], 18), dtype=np.float32)
        arr = np.empty((size, size, 3), dtype=np.float32)
        arr[:] = rng.uniform(180, 230)
        b = int(rng.integers(0, size // 8 + 1))
        arr[b : size - b, b : size - b] = colour
        arr += rng.normal(0.0, 4.0, size=arr.shape).astype(np.float32)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if attribute == "pattern":
        return Image.fromarray(_background(rng, size, ATTRIBUTES["pattern"][v]))
    img = Image.fromarray(_background(rng, size, "plain"))
    draw = ImageDraw.Draw(img)
    grey = int(rng.integers(60, 100))
    if attribute == "shape":
        ((cx, cy, r),) = _placements(rng, size, 1)
        _draw_shape(
            draw, ATTRIBUTES["shape"][v], cx, cy, r, rng.uniform(0, 2 * math.pi), (grey, grey, grey)
        )
    else:  # count: v + 1 grey dots
        for cx, cy, r in _placements(rng, size, v + 1):
            _draw_shape(draw, "circle", cx, cy, r * 0.7, 0.0, (grey, grey, grey))
    return img


def render_entity(rng: np.random.Generator, plan: Any, entity: int, size: int) -> Image.Image:
    if entity < plan.num_values:
        return render_value(rng, size, *plan.value_of[entity])
    return render_object(rng, size, plan.attrs_of(entity))


def encode_image(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=92)
    else:
        img.save(buf, format="PNG", compress_level=4)
    return buf.getvalue()


def write_images(
    out: Path, plan: Any, size: int, seed: int, inject_faults: bool
) -> tuple[dict[int, list[str]], dict[int, int]]:
    """Every entity's good pictures; returns their relative paths and counts per entity."""
    from tqdm import tqdm

    images: dict[int, list[str]] = {}
    for e in tqdm(
        range(len(plan.ids)), desc="synth images", unit="entity", disable=None, leave=False
    ):
        count = int(plan.num_images[e])
        if inject_faults and e == plan.empty_folder:
            count = 0  # withheld: this folder is the "empty_folder" fault
        paths = []
        if count:
            folder = out / "images" / plan.ids[e]
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, IMAGE_STREAM, e])
            fmt, ext = ("JPEG", "jpg") if plan.jpeg[e] else ("PNG", "png")
            for k in range(count):
                picture = render_entity(rng, plan, e, size)
                (folder / f"{k}.{ext}").write_bytes(encode_image(picture, fmt))
                paths.append(f"images/{plan.ids[e]}/{k}.{ext}")
        images[e] = paths
    return images, {e: len(p) for e, p in images.items()}


def write_faults(
    out: Path, plan: Any, size: int, seed: int, written: dict[int, int]
) -> list[dict[str, Any]]:
    """Faulty files beside the good pictures of a few objects, and one empty folder."""
    rng = np.random.default_rng([seed, FAULT_STREAM])
    objects = [o for o in range(plan.num_values, len(plan.ids)) if o != plan.empty_folder]
    # Hosts with the fewest good pictures, so a reader that keeps the first N still sees them.
    pool = [o for o in objects if written[o]] or objects
    tiebreak = rng.random(len(plan.ids))
    pool.sort(key=lambda o: (written[o], tiebreak[o]))

    def picture(entity: int) -> Image.Image:
        return render_entity(rng, plan, entity, size)

    def truncated(entity: int, fmt: str) -> bytes:
        data = encode_image(picture(entity), fmt)
        return data[: len(data) // 2]

    def one_by_one(entity: int) -> bytes:
        return encode_image(picture(entity).resize((1, 1)), "PNG")

    def gray_alpha(entity: int) -> bytes:
        img = picture(entity).convert("LA")
        alpha = np.full((size, size), 255, dtype=np.uint8)
        alpha[: size // 4] = 128
        img.putalpha(Image.fromarray(alpha))
        return encode_image(img, "PNG")

    specs = [  # kind, file name, expected, content
        ("truncated_png", "truncated.png", "bad", lambda e: truncated(e, "PNG")),
        ("truncated_jpeg", "truncated.jpg", "bad", lambda e: truncated(e, "JPEG")),
        ("zero_bytes", "zero.png", "bad", lambda e: b""),
        ("one_pixel", "tiny.png", "bad", one_by_one),
        (
            "text_as_jpeg",
            "not_an_image.jpg",
            "bad",
            lambda e: b"This is a text file, not a JPEG image.\n",
        ),
        (
            "cmyk_jpeg",
            "cmyk.jpg",
            "convertible",
            lambda e: encode_image(picture(e).convert("CMYK"), "JPEG"),
        ),
        ("gray_alpha_png", "gray_alpha.png", "convertible", gray_alpha),
    ]
    faults = []
    for i, (kind, name, expected, make) in enumerate(specs):
        entity = pool[i % len(pool)]
        folder = out / "images" / plan.ids[entity]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(make(entity))
        faults.append(
            {
                "path": f"images/{plan.ids[entity]}/{name}",
                "entity": plan.ids[entity],
                "kind": kind,
                "expected": expected,
            }
        )
    eid = plan.ids[plan.empty_folder]
    (out / "images" / eid).mkdir(parents=True, exist_ok=True)
    faults.append(
        {
            "path": f"images/{eid}",
            "entity": eid,
            "kind": "empty_folder",
            "expected": "empty_folder",
            "withheld_images": int(plan.num_images[plan.empty_folder]),
        }
    )
    return faults

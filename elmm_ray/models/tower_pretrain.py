"""Self-supervised pre-training of a tiny CLIP-architecture vision tower on procedural
pictures (:mod:`elmm_ray.data.tower_images`), for the CPU demo: it stands in for LLaVA's
pretrained CLIP ViT-L/14-336.

Objective: instance discrimination (SimCLR's NT-Xent) between two rendered views of each
scene of a batch, on the mean of the last layer's patch tokens through a small projection
head (dropped after training). Half of the batches draw their scenes from a narrow hue
range and some share one background texture, so that colour or texture alone cannot tell
the scenes apart. No labels, no KG facts, no KG images: the scene factors are used only by
the held-out linear probes written into the model card. Deterministic from ``seed`` on one
machine at a fixed thread count (the pictures of step ``k`` come from the stream
``(seed, k)``).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from elmm_ray.data.pixels import PixelSpec, tower_pixels
from elmm_ray.data.tower_images import TEXTURES, probe_labels, render, sample_scene

PROBE_STREAM = 1_000_000_007  # the probes' pictures: a stream no training step uses


@dataclass
class PretrainSettings:
    """``key=value`` settings of ``tools/pretrain_tower.py`` (the defaults made the committed
    tower)."""

    seed: int = 0
    image_size: int = 64
    patch_size: int = 8
    hidden: int = 96
    layers: int = 3
    heads: int = 4
    steps: int = 400
    batch: int = 96  # scenes per step (two views each)
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 30
    temperature: float = 0.2
    narrow_hue: float = 0.5  # share of batches whose scenes share a hue range of width 0.1
    shared_texture: float = 0.25  # share of batches whose scenes share one texture
    probe_scenes: int = 2000  # held-out pictures of the probes (70 % fit, 30 % scored)
    threads: int = 2

    @classmethod
    def parse(cls, pairs: list[str]) -> PretrainSettings:
        """Settings from ``key=value`` strings (an unknown key or a bad value: ValueError)."""
        types = {f.name: f.type for f in fields(cls)}
        values = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or key not in types:
                raise ValueError(f"{pair!r}: expected key=value with key one of "
                                 f"{', '.join(types)}")
            cast = float if types[key] in (float, "float") else int
            try:
                values[key] = cast(value)
            except ValueError:
                raise ValueError(f"{key}={value!r}: expected {cast.__name__}") from None
        settings = cls(**values)
        if settings.image_size % settings.patch_size or settings.hidden % settings.heads:
            raise ValueError("image_size must be a multiple of patch_size and hidden of heads")
        return settings


def probe_accuracy(x: np.ndarray, labels: list, seed: int = 0) -> float:
    """Held-out accuracy (30 %) of an L2-regularised softmax regression on standardised
    features (70 % fit)."""
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(v) for v in labels])
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[: int(0.7 * len(x))], order[int(0.7 * len(x)):]
    feats = torch.tensor(x, dtype=torch.float32)
    feats = (feats - feats[train].mean(0)) / (feats[train].std(0) + 1e-6)
    weight = torch.zeros(feats.shape[1], len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(500):
        optimizer.zero_grad()
        loss = F.cross_entropy(feats[train] @ weight + bias, y[train])
        (loss + 1e-3 * (weight**2).sum()).backward()
        optimizer.step()
    predicted = (feats[test] @ weight + bias).argmax(1)
    return float((predicted == y[test]).float().mean())


def new_tower(s: PretrainSettings):
    """The seeded random-init CLIP vision model of ``s``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=s.hidden, intermediate_size=2 * s.hidden,
                              num_hidden_layers=s.layers, num_attention_heads=s.heads,
                              image_size=s.image_size, patch_size=s.patch_size,
                              projection_dim=s.hidden)
    torch.manual_seed(s.seed)
    return CLIPVisionModel(config)


def _batch(s: PretrainSettings, step: int) -> list:
    """The scenes of training step ``step`` (its own random stream) and two views of each."""
    rng = np.random.default_rng([s.seed, step])
    hue, texture = (0.0, 1.0), None
    if rng.uniform() < s.narrow_hue:
        start = rng.uniform()
        hue = (start, start + 0.1)
    if rng.uniform() < s.shared_texture:
        texture = str(rng.choice(TEXTURES))
    scenes = [sample_scene(rng, hue_range=hue, texture=texture) for _ in range(s.batch)]
    return [render(rng, scene, s.image_size) for scene in scenes] + \
           [render(rng, scene, s.image_size) for scene in scenes]


def _pooled(tower, pixels: torch.Tensor, layer: int = -1) -> torch.Tensor:
    hidden = tower(pixels, output_hidden_states=True).hidden_states[layer]
    return hidden[:, 1:].mean(1)  # patch tokens (CLS dropped, as extraction does)


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss over ``2n`` embeddings whose rows ``i`` and ``i + n`` are two views."""
    z = F.normalize(z, dim=1)
    n = z.shape[0] // 2
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(logits, target)


def probe(tower, s: PretrainSettings, spec: PixelSpec) -> dict:
    """Linear-probe accuracy per scene factor on ``s.probe_scenes`` held-out pictures, from
    the mean patch token of layers -1 and -2."""
    rng = np.random.default_rng([s.seed, PROBE_STREAM])
    scenes = [sample_scene(rng) for _ in range(s.probe_scenes)]
    images = [render(rng, scene, s.image_size) for scene in scenes]
    pooled: dict[int, list] = {-1: [], -2: []}
    tower.eval()
    with torch.no_grad():
        for start in range(0, len(images), 256):
            pixels = torch.from_numpy(tower_pixels(images[start:start + 256], spec))
            states = tower(pixels, output_hidden_states=True).hidden_states
            for layer in pooled:
                pooled[layer].append(states[layer][:, 1:].mean(1).numpy())
    labels = [probe_labels(scene) for scene in scenes]
    out = {}
    for layer, chunks in pooled.items():
        x = np.concatenate(chunks)
        out[f"layer {layer}"] = {k: round(probe_accuracy(x, [lab[k] for lab in labels]), 3)
                                 for k in labels[0]}
    return out


def pretrain_tower(out: str | Path, s: PretrainSettings, log=print) -> dict:
    """Pre-train the tower of ``s`` and save it to ``out`` (``save_pretrained``: safetensors,
    config.json, preprocessor_config.json) with ``pretrain.json`` and a model card."""
    from transformers import CLIPImageProcessorPil

    torch.set_num_threads(s.threads)
    out = Path(out)
    spec = PixelSpec.clip(s.image_size)
    tower = new_tower(s)
    baseline = probe(tower, s, spec)
    log(f"random init probes: {baseline}")
    head = nn.Sequential(nn.Linear(s.hidden, s.hidden), nn.ReLU(), nn.Linear(s.hidden, 64))
    params = list(tower.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=s.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(
        1.0, (k + 1) / s.warmup) * 0.5 * (1 + math.cos(math.pi * min(k, s.steps) / s.steps)))
    start, losses = time.perf_counter(), []
    tower.train()
    for step in range(s.steps):
        pixels = torch.from_numpy(tower_pixels(_batch(s, step), spec))
        loss = nt_xent(head(_pooled(tower, pixels)), s.temperature)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(round(loss.item(), 4))
        if step % 50 == 0 or step == s.steps - 1:
            log(f"step {step}/{s.steps} loss {loss.item():.3f} "
                f"({time.perf_counter() - start:.0f} s)")
    seconds = time.perf_counter() - start
    probes = probe(tower, s, spec)
    log(f"probes: {probes}")
    tower.eval().save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": s.image_size},
                          crop_size={"height": s.image_size, "width": s.image_size}
                          ).save_pretrained(out)
    weights = out / "model.safetensors"
    record = {"settings": asdict(s), "train_seconds": round(seconds, 1),
              "losses_every_50": losses[::50] + losses[-1:],
              "probes": probes, "probes_random_init": baseline,
              "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
              "bytes": weights.stat().st_size, "torch": torch.__version__,
              "machine": f"{platform.machine()}, {s.threads} torch threads"}
    (out / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "README.md").write_text(model_card(record))
    return record


def model_card(r: dict) -> str:
    """The tower's model card: how it was made, its digest, its probe figures."""
    s = r["settings"]
    keys = list(r["probes"]["layer -1"])
    rows = [f"| {name} | " + " | ".join(f"{p[k]:.3f}" for k in keys) + " |"
            for name, p in (("pretrained, layer -1", r["probes"]["layer -1"]),
                            ("pretrained, layer -2", r["probes"]["layer -2"]),
                            ("random init, layer -1", r["probes_random_init"]["layer -1"]),
                            ("random init, layer -2", r["probes_random_init"]["layer -2"]))]
    args = " ".join(f"{k}={v}" for k, v in s.items())
    return f"""---
library_name: transformers
tags: [clip, vision, self-supervised, elmm_ray]
---
# elmm_ray tiny tower

A CLIP-architecture vision tower (`CLIPVisionModel`: {s['layers']} layers, width
{s['hidden']}, {s['image_size']} px images in {s['patch_size']} px patches:
{(s['image_size'] // s['patch_size']) ** 2} patch tokens + CLS) pre-trained
self-supervised on procedural pictures for elmm_ray's CPU demo, where it stands in for
LLaVA's CLIP ViT-L/14-336. Use it with `model.vision_tower=<this folder>`.

**How it was made.** `python tools/pretrain_tower.py OUT {args}`
(`elmm_ray/models/tower_pretrain.py`): {s['steps']} steps of SimCLR's NT-Xent (temperature
{s['temperature']}) between two rendered views of each of {s['batch']} scenes per step, on
the mean of the last layer's patch tokens through a projection head (discarded); AdamW,
lr {s['learning_rate']}, cosine schedule. Pictures: `elmm_ray/data/tower_images.py`
(coloured shapes on textured backgrounds; its own code and seeds, never a KG's images,
labels or facts). {r['train_seconds']:.0f} s of training on {r['machine']} (torch
{r['torch']}); deterministic from the seed on one machine at a fixed thread count.

**Weights.** `model.safetensors`: {r['bytes']:,} bytes, sha256 `{r['sha256']}`.

**Linear probes** (softmax regression on the mean patch token; {s['probe_scenes']} held-out
pictures of the generator from a stream no training step drew, 70 % fit, 30 % scored;
chance: hue 1/6, shape 1/8, count 1/4, texture 1/5):

| features | {' | '.join(keys)} |
|---|{'---|' * len(keys)}
{chr(10).join(rows)}
"""

"""The extract actor's call: how much of it is the vision tower, how much everything else.

    python bench/bench_extract_call.py [--batch 32] [--batches 8] [--tower mid]

An extract actor (``elmm_ray/data/extraction.py`` ``_TowerActor``) receives a block of
decoded pixels from Ray Data, converts it to a numpy batch, runs the tower and returns an
Arrow table of features. This runs that call in one process, as Ray Data does it (the block
an Arrow table with a tensor column, converted by Ray Data's own ``BlockAccessor``), and times
per batch: the block -> numpy conversion, the tower's forward (``encode_images``), and the
rest of the call (row selection, host copies, the Arrow table of the result). The figure of
the issue is ``outside_share``: the part of the actor's time not spent in the tower.

On a GPU the tower is far faster than here while the host work stays (the default tower has
LLaVA's CLIP ViT-L/14-336 shapes, so the host work per image is the real one), so the share
outside grows; ``gpu_share_estimate`` projects it with the tower rate measured on an H200
(``bench/results/gpu.json``, ViT-L/14-336 alone, images/s): an estimate, not a measurement
(the H2D / D2H copies of a GPU are not in it).
Saves bench/results/extract_call.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, save  # noqa: E402

sys.path.insert(0, str(REPO_ROOT))

from elmm_ray.tables import format_table  # noqa: E402

TOWERS = {  # CLIP-style towers built from a config (random init)
    "tiny": {"image_size": 64, "patch_size": 16, "hidden_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": 256},
    "mid": {"image_size": 224, "patch_size": 16, "hidden_size": 256, "num_hidden_layers": 6,
            "num_attention_heads": 4, "intermediate_size": 1024},
    # LLaVA-1.5's CLIP ViT-L/14-336 in every shape the host work sees (pixels 3x336x336,
    # 576 tokens x 1024 features per image) with 2 of its 24 layers: the host work per image is
    # the real one, the forward a fraction of it.
    "l14-shape": {"image_size": 336, "patch_size": 14, "hidden_size": 1024,
                  "num_hidden_layers": 2, "num_attention_heads": 16, "intermediate_size": 4096},
}


def make_actor(tower: str, layer: int = -2):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from elmm_ray.data.extraction import _TowerActor

    torch.manual_seed(0)
    config = CLIPVisionConfig(**TOWERS[tower])
    actor = object.__new__(_TowerActor)  # the actor's state without a saved backbone
    actor.tower = CLIPVisionModel(config).eval()
    actor.device = torch.device("cpu")
    grid = config.image_size // config.patch_size
    actor.layer, actor.pool, actor.tokens, actor.width = layer, 1, grid * grid, config.hidden_size
    return actor, config


def make_block(config, batch: int, failed: int, seed: int):
    """A decoded block as the decode tasks write it: ids, an error string per row (``failed``
    rows failed to decode: zero pixels), float32 pixels as a tensor column."""
    from elmm_ray.data.extraction import _rows_table

    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((batch, 3, config.image_size, config.image_size),
                                 dtype=np.float32)
    errors = ["decode failed" if i < failed else "" for i in range(batch)]
    pixels[:failed] = 0
    return _rows_table(np.arange(batch), [f"e{i}" for i in range(batch)], np.zeros(batch),
                       errors, "pixels", pixels)


def time_call(actor, block, zero_copy: bool) -> dict:
    from ray.data.block import BlockAccessor

    import elmm_ray.models.backbone as backbone

    tower_seconds = []
    encode = backbone.encode_images

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = encode(*args, **kwargs)
        tower_seconds.append(time.perf_counter() - start)
        return out

    backbone.encode_images = timed
    try:
        start = time.perf_counter()
        batch = BlockAccessor.for_block(block).to_batch_format("numpy")
        if not zero_copy:  # Ray Data's default for map_batches: writable copies
            batch = {k: np.array(v, copy=True) for k, v in batch.items()}
        converted = time.perf_counter()
        out = actor(batch)
        done = time.perf_counter()
    finally:
        backbone.encode_images = encode
    assert out.num_rows == block.num_rows
    tower = sum(tower_seconds)
    return {"convert": converted - start, "tower": tower,
            "rest": done - converted - tower, "total": done - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tower", choices=sorted(TOWERS), default="l14-shape")
    parser.add_argument("--batch", type=int, default=32, help="images per block")
    parser.add_argument("--batches", type=int, default=8, help="timed blocks (after 1 warm)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    actor, config = make_actor(args.tower)
    from elmm_ray.data import extraction

    zero_copy = extraction.ACTOR_ZERO_COPY_BATCH
    cases = {}
    for name, failed in (("all decoded", 0), ("one failed", 1)):
        blocks = [make_block(config, args.batch, failed, seed) for seed in range(args.batches + 1)]
        time_call(actor, blocks[0], zero_copy)  # warm-up
        rows = [time_call(actor, b, zero_copy) for b in blocks[1:]]
        per_image = {k: 1000 * statistics.median(r[k] for r in rows) / args.batch
                     for k in rows[0]}
        outside = per_image["convert"] + per_image["rest"]
        cases[name] = {**{f"{k}_ms_per_image": round(v, 4) for k, v in per_image.items()},
                       "outside_ms_per_image": round(outside, 4),
                       "outside_share": round(outside / per_image["total"], 4)}
    gpu_file = REPO_ROOT / "bench" / "results" / "gpu.json"
    gpu_rate = _gpu_tower_rate(gpu_file)
    for case in cases.values():
        if gpu_rate:
            tower_ms = 1000 / gpu_rate
            case["gpu_share_estimate"] = round(
                case["outside_ms_per_image"] / (case["outside_ms_per_image"] + tower_ms), 4)
    payload = {"command": " ".join(["python bench/bench_extract_call.py", *sys.argv[1:]]),
               "tower": {"name": args.tower, **TOWERS[args.tower]}, "batch": args.batch,
               "batches": args.batches, "threads": args.threads,
               "zero_copy_batch": zero_copy, "gpu_tower_images_per_s": gpu_rate,
               "cases": cases}
    keys = list(next(iter(cases.values())))
    print(format_table([[k, *[str(c.get(k, "")) for c in cases.values()]] for k in keys],
                       ["per batch of " + str(args.batch), *cases]))
    save("extract_call", payload)


def _gpu_tower_rate(path: Path) -> float | None:
    """The slowest tower-alone images/s of the H200 extraction run in gpu.json, if any."""
    if not path.is_file():
        return None
    batches = json.loads(path.read_text()).get("extraction", {}).get("by_batch", {})
    rates = [float(b["tower_images_per_s"]) for b in batches.values()]
    return min(rates) if rates else None


if __name__ == "__main__":
    main()

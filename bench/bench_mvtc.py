"""MVTC's pooling attentions: projecting every patch token (the plain formula) against
mapping the few queries into the feature space (what ``elmm_ray/models/mvtc.py`` runs).

    python bench/bench_mvtc.py [--repeats 7] [--threads 1]

Both paths run on the same MVTC module and the same inputs, interleaved, forward + backward
of the whole MVTC (both views; the patch features are frozen, as in training). The plain
path is the formula the folded one must equal: ``masked_attention`` (PyTorch's SDPA) over
``key_proj(context_norm(x))`` with the raw features as values, as the MVTC computed it
before. Shapes:

- ``demo``: a training step's candidate batch of ``configs/demo.yaml`` (66 entities, 4 images
  x 256 patch tokens of width 64, 8 + 8 queries, 4 heads);
- ``llava``: ``configs/fb15k237_llava7b.yaml``'s (LLaVA-1.5: 10 images x 576 tokens of width
  1024, 32 + 32 queries, 8 heads, text width 4096), 2 entities.

Then a whole training step of ``configs/demo.yaml`` (the local trainer's ``compute_loss`` +
backward + AdamW step, global batch 32 with its encoded candidates), both paths interleaved
on one model (``--steps`` per path; ``--steps 0`` skips it).

Saves bench/results/mvtc.json (medians in seconds, their ratio, and the largest difference
of the outputs) and prints a table.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, save  # noqa: E402

from elmm_ray.models.mvtc import (  # noqa: E402
    MVTC,
    CrossAttention,
    PoolingContext,
    masked_attention,
)
from elmm_ray.tables import format_table  # noqa: E402

DEMO = str(REPO_ROOT / "configs" / "demo.yaml")
SHAPES = {
    "demo": {"batch": 66, "images": 4, "tokens": 256, "width": 64, "n_visual": 8,
             "n_text": 8, "heads": 4, "text_width": 128, "text_tokens": 20},
    "llava": {"batch": 2, "images": 10, "tokens": 576, "width": 1024, "n_visual": 32,
              "n_text": 32, "heads": 8, "text_width": 4096, "text_tokens": 20},
}


def plain_forward(attention: CrossAttention, queries, context, context_mask, pooling=None):
    """Every patch token projected to a key, then attention (the plain formula)."""
    query = attention._split(attention.query_proj(attention.query_norm(queries)))
    keys = attention._split(attention.key_proj(attention.context_norm(context)))
    out = masked_attention(query, keys, attention._split(context), context_mask)
    return out.transpose(1, 2).flatten(2)


@contextmanager
def plain(mvtc: MVTC):
    """The pooling attentions of ``mvtc`` run the plain formula, and MVTC builds no pooling
    context for them (what the folded path prepares once a forward is not computed)."""
    pools = [m for m in mvtc.modules() if isinstance(m, CrossAttention)
             and m.raw_values]
    for attention in pools:
        attention.forward = plain_forward.__get__(attention)
    prepare = PoolingContext.__dict__["of"]
    PoolingContext.of = classmethod(lambda cls, *args: None)
    try:
        yield
    finally:
        PoolingContext.of = prepare
        for attention in pools:
            del attention.forward


def inputs(shape: dict, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    length = shape["images"] * shape["tokens"]
    patches = torch.randn(shape["batch"], length, shape["width"], generator=g)
    images = torch.randint(1, shape["images"] + 1, (shape["batch"],), generator=g)
    mask = (torch.arange(length)[None, :] < (images * shape["tokens"])[:, None])
    text = torch.randn(shape["batch"], shape["text_tokens"], shape["text_width"], generator=g)
    return patches, mask, text, torch.ones(shape["batch"], shape["text_tokens"], dtype=torch.bool)


def run(mvtc: MVTC, args: tuple) -> tuple[float, torch.Tensor]:
    mvtc.zero_grad(set_to_none=True)
    start = time.perf_counter()
    out, _ = mvtc(*args)
    out.square().mean().backward()
    return time.perf_counter() - start, out.detach()


def measure(name: str, shape: dict, repeats: int) -> dict:
    torch.manual_seed(0)
    mvtc = MVTC(shape["width"], shape["text_width"], shape["n_visual"], shape["n_text"],
                shape["heads"]).train()
    args = inputs(shape)
    times = {"plain": [], "folded": []}
    outs = {}
    for i in range(repeats + 1):  # the first round warms up, not counted
        for path in ("plain", "folded") if i % 2 else ("folded", "plain"):
            if path == "plain":
                with plain(mvtc):
                    seconds, outs[path] = run(mvtc, args)
            else:
                seconds, outs[path] = run(mvtc, args)
            if i:
                times[path].append(seconds)
    plain_s, folded_s = (statistics.median(times[p]) for p in ("plain", "folded"))
    return {"shape": name, **shape, "plain_seconds": round(plain_s, 5),
            "folded_seconds": round(folded_s, 5), "speedup": round(plain_s / folded_s, 2),
            "max_abs_difference": float((outs["plain"] - outs["folded"]).abs().max()),
            "max_abs_output": float(outs["plain"].abs().max())}


def training_step(steps: int) -> dict:
    """Median seconds of a local training step of the demo config with each path."""
    from elmm_ray.config import load_config
    from elmm_ray.data.dataset import load_dataset
    from elmm_ray.layout import absolute_paths
    from elmm_ray.pipeline import pipeline_stages
    from elmm_ray.stages import run_stages
    from elmm_ray.train.backends import TorchEngine
    from elmm_ray.train.context import build_context, build_features
    from elmm_ray.train.step import QueryBatches, compute_loss

    tmp = tempfile.TemporaryDirectory(prefix="bench_mvtc_")
    # preset tiny: the random tower whose shapes ``demo`` above copies (4 px patches)
    cfg = absolute_paths(load_config(DEMO, [f"run_dir={tmp.name}", "model.preset=tiny",
                                            "train.backend=local"]))
    run_stages([s for s in pipeline_stages(cfg) if s in ("synth", "pack", "extract")], cfg,
               show_progress=False)
    kg = load_dataset(cfg)
    ctx = build_context(cfg, kg, build_features(cfg, None, kg))
    model = ctx.model.train()
    engine = TorchEngine([p for p in model.parameters() if p.requires_grad], cfg, 10 * steps)
    batches = iter(QueryBatches(kg.queries("train"), cfg.train.global_batch_size, 0))
    known, generator = kg.filter_index(("train",)), torch.Generator().manual_seed(0)

    def one_step() -> float:
        _, _, micro = next(batches)
        start = time.perf_counter()
        parts = compute_loss(model, ctx.collator, ctx.features, micro[0], known,
                             num_negatives=cfg.train.num_negatives, knowledge_weight=0.0,
                             generator=generator)
        engine.backward(parts.loss)
        engine.step()
        return time.perf_counter() - start

    times = {"plain": [], "folded": []}
    for i in range(steps + 1):
        for path in ("plain", "folded") if i % 2 else ("folded", "plain"):
            if path == "plain":
                with plain(model.mvtc):
                    seconds = one_step()
            else:
                seconds = one_step()
            if i:
                times[path].append(seconds)
    tmp.cleanup()
    plain_s, folded_s = (statistics.median(times[p]) for p in ("plain", "folded"))
    return {"config": "configs/demo.yaml", "steps_per_path": steps,
            "plain_seconds": round(plain_s, 4), "folded_seconds": round(folded_s, 4),
            "speedup": round(plain_s / folded_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(name, SHAPES[name], args.repeats) for name in args.shapes.split(",")]
    step = training_step(args.steps) if args.steps else None
    print(format_table([[r["shape"], r["batch"], r["images"] * r["tokens"],
                         f"{r['plain_seconds']:.4f}", f"{r['folded_seconds']:.4f}",
                         f"{r['speedup']:.2f}", f"{r['max_abs_difference']:.1e}"] for r in rows],
                       ["shape", "entities", "patch tokens", "plain s", "folded s", "speedup",
                        "max |diff|"],
                       title=f"MVTC forward + backward, {args.threads} thread(s), median of "
                             f"{args.repeats}"))
    if step:
        print(format_table([[p, f"{step[p + '_seconds']:.3f}"] for p in ("plain", "folded")]
                           + [["speedup", f"{step['speedup']:.2f}"]], ["path", "s / step"],
                           title=f"a training step of configs/demo.yaml (local, median of "
                                 f"{args.steps})"))
    save("mvtc", {"command": shlex.join(["python", "bench/bench_mvtc.py", *sys.argv[1:]]),
                  "threads": args.threads, "repeats": args.repeats, "rows": rows,
                  "training_step": step})


if __name__ == "__main__":
    main()

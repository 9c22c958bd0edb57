"""Token compression: query-encoding time of MVTC vs the uncompressed LLaVA-style prompt.

Both models share one random backbone (same weights); the uncompressed one puts every
projected patch token of every image into the prompt. At each tokens-per-image count the
two take turns in every repeat (one process, fixed torch threads), so machine load hits
both alike; the table gives medians and minima of wall and CPU time, the measured FLOPs of
one pass (their ratio is the limit of the speedup) and where the time goes (MVTC,
projector, embeddings, prompt packing, LLM, readout; scoring apart). Also the analytic
FLOP ratio at the paper's shape (LLaVA-1.5-7B, 10 images x 576 tokens, 32 + 32 MVTC tokens).

    python bench/bench_compression.py                  # mid: LLM 1024x8, 10 x 144 and 576
    python bench/bench_compression.py --shape small    # the old LLM 512x4, 10 x 144
    python bench/bench_compression.py --quick          # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mb, save  # noqa: E402
from encode_timing import (  # noqa: E402
    PHASES,
    SHAPES,
    build_models,
    count_flops,
    interleaved,
    prompt_tokens,
)

from elmm_ray.tables import format_table  # noqa: E402


def prefill_flops(params: float, layers: int, width: int, tokens: int) -> float:
    """Forward FLOPs of a decoder over ``tokens`` tokens: 2 * params per token (matmuls)
    plus attention scores and mixing (4 * tokens^2 * width per layer)."""
    return 2 * params * tokens + 4 * layers * tokens**2 * width


def mvtc_flops(queries: int, patches: int, feature_dim: int) -> float:
    """Cross-attention of ``queries`` over ``patches`` (keys + scores + pooling)."""
    keys = 2 * patches * feature_dim * feature_dim
    return keys + 4 * queries * patches * feature_dim


def paper_shape_ratio(text_tokens: int = 40) -> dict:
    """LLaVA-1.5-7B (6.74e9 params, 32 layers, width 4096; CLIP width 1024)."""
    params, layers, width, clip = 6.74e9, 32, 4096, 1024
    patches = 10 * 576
    projector = 2 * patches * (clip * width + width * width)  # 2-layer MLP on every patch
    full = prefill_flops(params, layers, width, text_tokens + patches) + projector
    compressed_tokens = text_tokens + 64
    compressed = (prefill_flops(params, layers, width, compressed_tokens)
                  + mvtc_flops(64, patches, clip) + 2 * 64 * (clip * width + width * width))
    return {"prompt_tokens_uncompressed": text_tokens + patches,
            "prompt_tokens_mvtc": compressed_tokens,
            "gflops_uncompressed": full / 1e9, "gflops_mvtc": compressed / 1e9,
            "flop_ratio": full / compressed}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("mid", "small"), default="mid",
                        help="mid: LLM 1024x8 (16 heads, 8 KV), MLP 4096, 10 x 144 and 576 "
                        "tokens; small: LLM 512x4, 10 x 144 (the earlier benchmark)")
    parser.add_argument("--tokens", default="",
                        help="comma-separated patch tokens per image (square numbers); "
                        "default: the shape's")
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--batch", type=int, default=0,
                        help="queries per batch (0: the shape's CPU batch per token count)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="interleaved repeats (the shape may use fewer at a large token "
                        "count: mid, 576 tokens: 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 is the most stable on a shared machine")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 3 repeats")
    parser.add_argument("--name", default="", help="results name (default by shape)")
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.repeats = "quick", 3
    args.name = args.name or {"mid": "compression", "small": "compression_small",
                              "quick": "compression_quick"}[args.shape]
    return args


def run_tokens(shape: dict, tokens: int, args: argparse.Namespace) -> dict:
    """Both models at one tokens-per-image count: prompt, FLOPs, timings, phases."""
    batch_size = args.batch or shape["batch"][tokens]
    repeats = min(args.repeats, shape.get("repeats", {}).get(tokens, args.repeats))
    models, batch = build_models(shape, tokens, args.images, batch_size)
    load_before = os.getloadavg()
    prompt = {name: prompt_tokens(m, batch) for name, m in models.items()}
    start = time.perf_counter()
    flops = {name: count_flops(m, batch) for name, m in models.items()}  # doubles as warm-up
    print(f"{tokens} tokens/image, batch {batch_size}: FLOPs counted in "
          f"{time.perf_counter() - start:.0f}s", flush=True)
    timing = interleaved(models, batch, repeats, log=lambda s: print(s, flush=True))
    load_after = os.getloadavg()
    mvtc, full = timing["mvtc"], timing["uncompressed"]
    ratios = {
        "wall_median": full["wall_median"] / mvtc["wall_median"],
        "wall_min": full["wall_min"] / mvtc["wall_min"],
        "cpu_median": full["cpu_median"] / mvtc["cpu_median"],
        "paired_wall_median": sorted(f / m for f, m in zip(full["wall"], mvtc["wall"]))
        [len(full["wall"]) // 2],
        "flops": flops["uncompressed"]["total"] / flops["mvtc"]["total"],
    }
    return {"tokens_per_image": tokens, "images": args.images, "batch": batch_size,
            "repeats": repeats,
            "prompt_tokens": prompt, "flops": flops, "timing": timing, "speedup": ratios,
            "load_average": {"before": load_before, "after": load_after}}


def print_tokens(result: dict) -> None:
    batch, repeats = result["batch"], result["repeats"]
    rows = []
    for name in ("uncompressed", "mvtc"):
        t, f = result["timing"][name], result["flops"][name]
        phases = t["phase_median"]
        rows.append((name, f"{result['prompt_tokens'][name]:.0f}",
                     f"{f['total'] / batch / 1e9:.1f}",
                     f"{t['wall_median'] * 1000 / batch:.0f}",
                     f"{t['wall_min'] * 1000 / batch:.0f}",
                     f"{t['cpu_median'] * 1000 / batch:.0f}",
                     *(f"{phases[p] * 1000 / batch:.1f}" for p in PHASES),
                     f"{t['scoring_median'] * 1000 / batch:.1f}"))
    load = result["load_average"]
    print(format_table(
        rows, ["prompt", "tokens", "GFLOP/q", "wall ms/q med", "wall ms/q min", "cpu ms/q med",
               *(f"{p} cpu ms/q" for p in PHASES), "scoring wall ms/q"],
        title=f"{result['images']} images x {result['tokens_per_image']} tokens, batch {batch}, "
              f"{repeats} interleaved repeats (load average {load['before'][0]:.2f} -> "
              f"{load['after'][0]:.2f})"))
    s = result["speedup"]
    print(f"speedup of MVTC: wall median {s['wall_median']:.1f}x, wall min {s['wall_min']:.1f}x, "
          f"cpu median {s['cpu_median']:.1f}x, paired {s['paired_wall_median']:.1f}x; "
          f"FLOP ratio {s['flops']:.1f}x", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    token_counts = ([int(t) for t in args.tokens.split(",") if t] if args.tokens
                    else list(shape["tokens"]))
    if args.batch == 0 and any(t not in shape["batch"] for t in token_counts):
        raise SystemExit(f"--tokens {args.tokens}: no default batch for the {args.shape} "
                         "shape; give --batch")
    started = time.perf_counter()
    print(f"shape {args.shape}: LLM {shape['llm_hidden']}x{shape['llm_layers']} "
          f"(MLP {shape['llm_intermediate']}), vision width {shape['vision_hidden']}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    paper = paper_shape_ratio()
    command = "python bench/bench_compression.py " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    results = []
    for tokens in token_counts:
        results.append(run_tokens(shape, tokens, args))
        print_tokens(results[-1])
        save_results(args, shape, command, results, paper, started)  # each count as it ends
    print(f"paper shape (7B, 10 x 576 tokens): {paper['prompt_tokens_uncompressed']} -> "
          f"{paper['prompt_tokens_mvtc']} prompt tokens, FLOP ratio {paper['flop_ratio']:.1f}x "
          f"({paper['gflops_uncompressed']:,.0f} vs {paper['gflops_mvtc']:,.0f} GFLOP/query)")


def save_results(args: argparse.Namespace, shape: dict, command: str, results: list[dict],
                 paper: dict, started: float) -> None:
    save(args.name, {
        "command": command, "args": vars(args),
        "shape": {k: v for k, v in shape.items() if k not in ("batch", "repeats")},
        "threads": torch.get_num_threads(), "results": results, "paper_shape": paper,
        "notes": [
            "time = ELMM.encode_queries of one batch (precomputed patch features in, query "
            "vectors out); scoring (ELMM.score against all entities, which recomputes the "
            "entity vectors) is timed apart and not in the ratio",
            "phases: CPU seconds (this thread) from forward hooks on the model's own "
            "modules, summing to the CPU time of the pass; packing = "
            "build_prompt minus the MVTC/projector/embedding calls inside it",
            "FLOPs: torch.utils.flop_counter over one pass (matmuls, attention counted "
            "over the full L x L scores as the kernel computes them); elementwise ops, "
            "norms and softmax are not counted",
            "the training batch (32) does not fit the CPU budget uncompressed; the CPU batch "
            "is per token count (the ratio is per batch, both variants on the same batch)",
        ],
        "seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()})


if __name__ == "__main__":
    main()

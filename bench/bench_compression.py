"""Token compression: query-encoding latency of MVTC vs the uncompressed LLaVA-style prompt.

Both models share one backbone (same weights); the uncompressed one puts every projected
patch token of every image into the prompt. Latencies are medians over interleaved
repeats in one process, so the ratio is robust to a noisy machine. Also the analytic
FLOP ratio at the paper's shape (LLaVA-1.5-7B, 10 images x 576 tokens, 32 + 32 MVTC tokens).

    python bench/bench_compression.py [--llm-hidden 512 --llm-layers 4 --images 10 ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mb, save  # noqa: E402

from elmm_ray.config import build_config  # noqa: E402
from elmm_ray.data.collate import QueryCollator  # noqa: E402
from elmm_ray.models.backbone import image_feature_shape  # noqa: E402
from elmm_ray.models.build import build_elmm, build_tokenizer  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--llm-hidden", type=int, default=512)
    parser.add_argument("--llm-layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=192, help="192/16 -> 144 tokens")
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--n-visual", type=int, default=32)
    parser.add_argument("--n-text", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.llm_hidden, args.llm_layers, args.image_size, args.repeats = 128, 2, 64, 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    common = [f"model.llm_hidden={args.llm_hidden}", f"model.llm_layers={args.llm_layers}",
              f"model.llm_intermediate={4 * args.llm_hidden}", "model.llm_heads=8",
              "model.llm_kv_heads=8", f"model.image_size={args.image_size}",
              "model.patch_size=16", "model.vision_hidden=256", "model.vision_heads=8",
              f"mvtc.n_visual={args.n_visual}", f"mvtc.n_text={args.n_text}", "mvtc.heads=8"]
    names = [f"entity {i} with a name of some words" for i in range(64)]
    relations = ["relation one", "relation two"]
    cfg = build_config(overrides=common)
    tokenizer = build_tokenizer(cfg, names + relations)
    mvtc_model = build_elmm(cfg, num_entities=64, tokenizer=tokenizer).eval()
    full_model = build_elmm(build_config(overrides=[*common, "model.uncompressed=true"]),
                            num_entities=64, tokenizer=tokenizer).eval()
    full_model.backbone = mvtc_model.backbone  # identical backbone weights
    collator = QueryCollator(tokenizer, names, relations, 2, 32)
    tokens, width = image_feature_shape(mvtc_model.backbone)
    entities = torch.arange(args.batch)
    batch = collator(entities, torch.zeros(args.batch, dtype=torch.long),
                     torch.randn(args.batch, args.images, tokens, width),
                     torch.ones(args.batch, args.images, dtype=torch.bool))

    times: dict[str, list[float]] = {"mvtc": [], "uncompressed": []}
    with torch.no_grad():
        for model in (mvtc_model, full_model):  # warm-up
            model.encode_queries(batch)
        for _ in range(args.repeats):
            for name, model in (("mvtc", mvtc_model), ("uncompressed", full_model)):
                start = time.perf_counter()
                model.encode_queries(batch)
                times[name].append(time.perf_counter() - start)
        prompt_len = {name: int(model.build_prompt(batch)[1].sum(1).float().mean())
                      for name, model in (("mvtc", mvtc_model), ("uncompressed", full_model))}
    median = {k: statistics.median(v) for k, v in times.items()}
    speedup = median["uncompressed"] / median["mvtc"]
    paper = paper_shape_ratio()
    rows = [(name, prompt_len[name], f"{median[name] * 1000:.1f}",
             f"{median[name] * 1000 / args.batch:.1f}") for name in ("uncompressed", "mvtc")]
    print(format_table(rows, ["prompt", "tokens/query", "ms/batch", "ms/query"],
                       title=f"query encoding on CPU: LLM {args.llm_hidden}x{args.llm_layers}, "
                             f"{args.images} images x {tokens} tokens, batch {args.batch}, "
                             f"median of {args.repeats}"))
    print(f"measured speedup of MVTC over uncompressed: {speedup:.1f}x")
    print(f"paper shape (7B, 10 x 576 tokens): {paper['prompt_tokens_uncompressed']} -> "
          f"{paper['prompt_tokens_mvtc']} prompt tokens, FLOP ratio {paper['flop_ratio']:.1f}x "
          f"({paper['gflops_uncompressed']:,.0f} vs {paper['gflops_mvtc']:,.0f} GFLOP/query)")
    save("compression", {"args": vars(args), "prompt_tokens": prompt_len,
                         "median_seconds": median, "all_seconds": times,
                         "measured_speedup": speedup, "paper_shape": paper,
                         "peak_rss_mb": peak_rss_mb()})


if __name__ == "__main__":
    main()

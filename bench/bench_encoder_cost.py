"""What the entity encoder (``model.entity_repr=encoder``) costs at paper scale, from FLOP
counts: FB15k-237 (14,541 entities, 272,115 training triples, both directions),
LLaVA-1.5-7B, 64 MVTC tokens over 10 images x 576 patch tokens, 48 text tokens (the
paper config's `model.max_text_tokens`), 16 queries per GPU (its
`train.global_batch_size` of 128 over 8 GPUs). It
prices one refresh of the entity cache (every entity encoded once, forward only), one
training step (queries and their encoded candidates, forward + backward) and the feature
bytes a refresh reads, and converts FLOPs into minutes on 8 x A100 at an assumed model-FLOP
utilisation.

    python bench/bench_encoder_cost.py [--gpus 8] [--batch 32] [--negatives 16] [--mfu 0.4]

These are estimates from the formulas of ``bench_compression.py`` (2 x params per token +
attention; MVTC cross-attention; the projector on the 64 tokens), not timings: the MFU is
an assumption (prefill of ~100-token prompts in batches of 32+ sequences runs at 40-60 %
on A100s in bf16). Results: ``results/encoder_cost.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compression import mvtc_flops, prefill_flops  # noqa: E402
from common import save  # noqa: E402

from elmm_ray.tables import format_table  # noqa: E402

PARAMS, LAYERS, WIDTH, CLIP = 6.74e9, 32, 4096, 1024  # LLaVA-1.5-7B, CLIP ViT-L/14-336
PATCHES, MVTC_TOKENS = 10 * 576, 64
ENTITIES, TRAIN_TRIPLES = 14_541, 272_115  # FB15k-237
A100_BF16 = 312e12  # dense bf16 peak FLOP/s


def encoding_flops(text_tokens: int, extra_tokens: int) -> float:
    """Forward FLOPs of one prompt: ``<s>`` + text + MVTC tokens + ``extra_tokens``."""
    tokens = 1 + text_tokens + MVTC_TOKENS + extra_tokens
    projector = 2 * MVTC_TOKENS * (CLIP * WIDTH + WIDTH * WIDTH)
    return (prefill_flops(PARAMS, LAYERS, WIDTH, tokens) + mvtc_flops(MVTC_TOKENS, PATCHES, CLIP)
            + projector)


def estimate(args: argparse.Namespace) -> dict:
    entity = encoding_flops(args.text_tokens, 1)  # + <readout>
    query = encoding_flops(args.text_tokens, args.relation_tokens + 2)  # + <inv>, <readout>
    refresh = ENTITIES * entity
    # Per rank and step: its queries, and candidates = their answers + query entities
    # (at most 2 per query) + the shared sampled and hard negatives, all with gradients.
    candidates = 2 * args.batch + args.negatives + args.hard_negatives
    step_forward = args.batch * query + candidates * entity
    step = args.backward_factor * step_forward
    steps_per_epoch = 2 * TRAIN_TRIPLES // (args.batch * args.gpus)
    throughput = args.gpus * A100_BF16 * args.mfu
    feature_bytes = ENTITIES * PATCHES * CLIP * 2  # fp16 patch features read per refresh
    return {
        "entity_encoding_gflops": entity / 1e9, "query_encoding_gflops": query / 1e9,
        "refresh_pflops": refresh / 1e15,
        "refresh_minutes": refresh / throughput / 60,
        "step_pflops_per_rank": step / 1e15,
        "step_seconds": step / (A100_BF16 * args.mfu),
        "refresh_in_steps": refresh / (step * args.gpus),
        "steps_per_epoch": steps_per_epoch,
        "epoch_minutes": steps_per_epoch * step / (A100_BF16 * args.mfu) / 60,
        "refresh_feature_gb": feature_bytes / 1e9,
        "overhead_refresh_every": {
            str(n): refresh / (step * args.gpus * n) for n in (100, 500, steps_per_epoch)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16,
                        help="queries per GPU and step (the paper config's "
                        "train.global_batch_size / 8)")
    parser.add_argument("--negatives", type=int, default=16, help="train.num_negatives")
    parser.add_argument("--hard-negatives", type=int, default=0, help="train.hard_negatives")
    parser.add_argument("--text-tokens", type=int, default=48,
                        help="model.max_text_tokens (configs/fb15k237_llava7b.yaml: 48)")
    parser.add_argument("--relation-tokens", type=int, default=8)
    parser.add_argument("--backward-factor", type=float, default=3.0,
                        help="training FLOPs / forward FLOPs (3: full backward; LoRA ~2)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed FLOP utilisation")
    args = parser.parse_args()
    figures = estimate(args)
    rows = [
        ("entity encoding (GFLOP)", f"{figures['entity_encoding_gflops']:,.0f}"),
        ("query encoding (GFLOP)", f"{figures['query_encoding_gflops']:,.0f}"),
        ("refresh: all 14,541 entities (PFLOP)", f"{figures['refresh_pflops']:.1f}"),
        (f"refresh on {args.gpus} x A100 at {args.mfu:.0%} MFU (min)",
         f"{figures['refresh_minutes']:.2f}"),
        ("feature bytes read per refresh (GB, fp16)", f"{figures['refresh_feature_gb']:.0f}"),
        ("training step per rank (PFLOP)", f"{figures['step_pflops_per_rank']:.2f}"),
        ("training step (s)", f"{figures['step_seconds']:.2f}"),
        ("one refresh = training steps", f"{figures['refresh_in_steps']:.1f}"),
        ("steps per epoch", f"{figures['steps_per_epoch']:,}"),
        ("epoch (min)", f"{figures['epoch_minutes']:.0f}"),
        *[(f"refresh every {n} steps: overhead", f"{v:.1%}")
          for n, v in figures["overhead_refresh_every"].items()],
    ]
    print(format_table(rows, ["quantity", "estimate"]))
    save("encoder_cost", {"command": "python bench/bench_encoder_cost.py " + " ".join(sys.argv[1:]),
                          "args": vars(args), "estimates": figures,
                          "note": "FLOP-count estimates at an assumed MFU, not timings"})


if __name__ == "__main__":
    main()

"""Query-encoding speed of structured pruning at the mid shape (part of bench_prune.py).

A random-weight MVTC model at the compression benchmark's shape (LLM 1024x8, 16 heads in 8
KV groups, MLP 4096; 10 images of random patch features) over the synthetic KG's entities
and texts. Knowledge-guided importance (gradients of L_knowledge on training queries of the
KG) is computed once; each ratio removes units by it from a fresh copy (the pruned model's
real shapes: smaller ``nn.Linear`` modules, no masks). The unpruned and pruned models take
turns in every timed repeat. Per model: FLOPs split into what pruning can shrink (the
q/k/v/o and gate/up/down projections) and the rest, and the phase profile of a pass.

    python bench/bench_prune.py --speed-only     # this part alone (~5 min on 2 CPU cores)
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encode_timing import PHASES, SHAPES, count_flops, interleaved, shape_overrides  # noqa: E402

from elmm_ray.config import build_config  # noqa: E402
from elmm_ray.data.collate import QueryCollator  # noqa: E402
from elmm_ray.data.kg import KnowledgeGraph  # noqa: E402
from elmm_ray.models.build import build_elmm  # noqa: E402
from elmm_ray.pruning.base import CalibrationData, PruneOptions, sample_queries  # noqa: E402
from elmm_ray.pruning.structured import (  # noqa: E402
    KnowledgePruner,
    layer_shapes,
    original_prunable_parameters,
    prunable_parameters,
)


class RandomFeatures:
    """Seeded random patch features per entity (the FeatureBank interface), mid shape."""

    def __init__(self, images: int, tokens: int, width: int, seed: int = 0) -> None:
        self.shape = (images, tokens, width)
        self.seed = seed

    def features_for(self, entity_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.as_tensor(entity_ids, dtype=torch.long)
        out = torch.empty(len(ids), *self.shape)
        for row, entity in enumerate(ids.tolist()):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + entity)
            out[row] = torch.randn(self.shape, generator=generator)
        return out, torch.ones(len(ids), self.shape[0], dtype=torch.bool)


def run_speed(kg: KnowledgeGraph, tokenizer, entity_texts: list[str], ratios: list[float],
              *, all_ratios: tuple[float, ...] = (0.3,), shape_name: str = "mid",
              tokens: int = 144, images: int = 10,
              batch_size: int = 32, repeats: int = 5, calib_samples: int = 32,
              min_neurons: int = 8, log=print) -> dict:
    """Speed of knowledge-guided structured pruning at ``ratios`` of the prunable LLM
    parameters (the pruner's own measure), and at ``all_ratios`` of all the model's
    parameters (the 002 paper's measure: rows named "30% of all"); see the module doc."""
    shape = SHAPES[shape_name]
    cfg = build_config(overrides=shape_overrides(shape, tokens))
    torch.manual_seed(0)
    base = build_elmm(cfg, num_entities=kg.num_entities, tokenizer=tokenizer).eval()
    collator = QueryCollator(tokenizer, entity_texts, kg.relation_texts, kg.num_relations,
                             cfg.model.max_text_tokens)
    features = RandomFeatures(images, tokens, shape["vision_hidden"])
    calib = CalibrationData(collator, features,
                            sample_queries(kg.queries("train"), calib_samples, 0),
                            kg.filter_index(("train",)), batch_size=16)
    test = np.asarray(sample_queries(kg.queries("test"), batch_size, 0))
    ids = torch.as_tensor(test[:, 0])
    feats, mask = features.features_for(ids)
    batch = collator(ids, torch.as_tensor(test[:, 1]), feats, mask)

    pruner = KnowledgePruner(PruneOptions(min_neurons_per_layer=min_neurons))
    start = time.perf_counter()
    scores = pruner.score(base, calib)
    score_seconds = time.perf_counter() - start
    log(f"mid-shape speed: knowledge importance from {calib_samples} queries in "
        f"{score_seconds:.0f}s")
    models = {"unpruned": base}
    plans = {}
    total = sum(p.numel() for p in base.parameters())
    original = original_prunable_parameters(base)
    targets = [(f"{r:.0%}", r) for r in ratios]
    targets += [(f"{r:.0%} of all", r * total / original) for r in all_ratios]
    for name, amount in targets:
        model = copy.deepcopy(base)
        plan = pruner.plan(model, scores, amount)
        report = pruner.apply(model, plan, calib)
        models[name] = model.eval()
        plans[name] = {"amount_of_prunable": amount, "removed_share": report["removed_share"],
                       "layers": layer_shapes(model),
                       "prunable_params": prunable_parameters(model)}
    flops = {name: count_flops(m, batch) for name, m in models.items()}  # also warms up
    load_before = os.getloadavg()
    timing = interleaved(models, batch, repeats, log=log)
    load_after = os.getloadavg()
    ref = timing["unpruned"]
    rows = {}
    for name, t in timing.items():
        f = flops[name]
        params = {"llm": sum(p.numel() for p in models[name].language_model.parameters()),
                  "total": sum(p.numel() for p in models[name].parameters()),
                  "prunable": prunable_parameters(models[name])}
        rows[name] = {
            "params": params, "flops": f,
            "wall_median_s": t["wall_median"], "wall_min_s": t["wall_min"],
            "cpu_median_s": t["cpu_median"], "wall_s": t["wall"], "cpu_s": t["cpu"],
            "phase_median_s": t["phase_median"],
            "speedup": {
                "cpu_median": ref["cpu_median"] / t["cpu_median"],
                "wall_median": ref["wall_median"] / t["wall_median"],
                "wall_min": ref["wall_min"] / t["wall_min"],
                "paired_wall_median": statistics.median(
                    r / m for r, m in zip(ref["wall"], t["wall"])),
                "flops": flops["unpruned"]["total"] / f["total"],
            },
            "plan": plans.get(name),
        }
    base_flops = flops["unpruned"]
    return {
        "shape": shape_name, "llm": {k: shape[k] for k in ("llm_hidden", "llm_layers",
                                                            "llm_heads", "llm_kv_heads",
                                                            "llm_intermediate")},
        "vision_hidden": shape["vision_hidden"], "tokens_per_image": tokens, "images": images,
        "batch": batch_size, "repeats": repeats, "calib_samples": calib_samples,
        "threads": torch.get_num_threads(), "importance_seconds": score_seconds,
        "prunable_flop_share": base_flops["prunable"] / base_flops["total"],
        "load_average": {"before": load_before, "after": load_after}, "models": rows,
    }


def speed_table(speed: dict) -> tuple[list[tuple], list[str], str]:
    """Rows, headers and title of the printed/markdown table of :func:`run_speed`."""
    rows = []
    batch = speed["batch"]
    total = speed["models"]["unpruned"]["params"]["total"]
    for name, r in speed["models"].items():
        s, f, p = r["speedup"], r["flops"], r["phase_median_s"]
        rows.append((name, f"{r['params']['prunable'] / 1e6:.1f}M",
                     f"{1 - r['params']['total'] / total:.1%}",
                     f"{f['total'] / batch / 1e9:.1f}", f"{f['prunable'] / f['total']:.0%}",
                     f"{r['cpu_median_s'] * 1000 / batch:.1f}",
                     f"{r['wall_min_s'] * 1000 / batch:.1f}",
                     f"{s['cpu_median']:.2f}x", f"{s['wall_min']:.2f}x",
                     f"{s['paired_wall_median']:.2f}x", f"{s['flops']:.2f}x",
                     *(f"{p[k] * 1000 / batch:.1f}" for k in PHASES)))
    headers = ["model", "prunable params", "removed of all params", "GFLOP/q",
               "prunable FLOPs", "cpu ms/q",
               "wall min ms/q", "speedup cpu", "speedup wall min", "speedup paired",
               "FLOP ratio", *(f"{k} cpu ms/q" for k in PHASES)]
    llm = speed["llm"]
    load = speed["load_average"]
    title = (f"Knowledge-guided structured pruning, query-encoding speed at the {speed['shape']} "
             f"shape (random weights): LLM {llm['llm_hidden']}x{llm['llm_layers']}, "
             f"{llm['llm_heads']} heads / {llm['llm_kv_heads']} KV, MLP "
             f"{llm['llm_intermediate']}; {speed['images']} images x "
             f"{speed['tokens_per_image']} tokens, MVTC, batch {batch}, {speed['repeats']} "
             f"interleaved repeats, {speed['threads']} thread(s), load average "
             f"{load['before'][0]:.2f} -> {load['after'][0]:.2f}")
    return rows, headers, title


def speed_markdown(speed: dict) -> str:
    """The speed table as a markdown section (appended to prune.md)."""
    rows, headers, title = speed_table(speed)
    share = speed["prunable_flop_share"]
    lines = [f"## Speed at the {speed['shape']} shape", "", title + ".", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    lines += ["", f"- prunable FLOPs (q/k/v/o + gate/up/down projections) are {share:.1%} of "
              "the unpruned pass: removing a share r of them alone gives a FLOP speedup of "
              f"1 / (1 - r * {share:.3f}) (r = 30%: {1 / (1 - 0.3 * share):.2f}x)",
              "- speedup cpu: ratio of median CPU times (this thread); wall min: ratio of the "
              "best wall times; paired: median of per-repeat wall ratios; FLOP ratio: "
              "measured FLOPs (torch.utils.flop_counter) of one pass",
              f"- command: `{speed.get('command', '')}`", ""]
    return "\n".join(lines)

"""Measurements and the pruning report (``prune_report.md`` / ``.json`` / ``.png``).

One row per method x compression ratio (rows of several seeds are averaged, with the
spread): parameters (LLM and total, LoRA merged), query-encoding latency (median of
timed passes over fixed batches, interleaved with the unpruned model when both are at
hand) and speedup, forward peak memory, MRR / Hits@1 / type-violation rate right after
pruning and after fine-tuning, and the retained share of the unpruned Hits@1. The
layout follows Table 1 of the knowledge-guided pruning paper (002).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from elmm_ray.data.collate import QueryCollator
from elmm_ray.data.image_features import FeatureBank
from elmm_ray.layout import write_json_atomic
from elmm_ray.models.elmm import ELMM

REPORT_NAME = "prune_report"
METRIC_KEYS = ("mrr", "hits@1", "hits@3", "hits@10", "type_violation")


# --- measurements ----------------------------------------------------------------------------


def count_parameters(model: ELMM) -> dict[str, int]:
    """Parameters of the LLM and of the whole ELMM, LoRA adapters not counted (as merged)."""
    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for n, p in module.named_parameters() if ".lora_" not in n)

    return {"llm": count(model.language_model), "total": count(model)}


def overall_metrics(metrics: dict) -> dict[str, float]:
    """The headline numbers of an ``evaluate_model`` result."""
    overall = metrics.get("overall", metrics)
    return {k: float(overall[k]) for k in METRIC_KEYS if k in overall}


def timing_batches(collator: QueryCollator, features: FeatureBank, queries: np.ndarray,
                   batch_size: int, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` collated query batches (fixed inputs for latency measurements)."""
    out = []
    for start in range(0, min(len(queries), batch_size * count), batch_size):
        chunk = torch.as_tensor(np.asarray(queries[start : start + batch_size]),
                                dtype=torch.long)
        feats, mask = features.features_for(chunk[:, 0])
        out.append(collator(chunk[:, 0], chunk[:, 1], feats, mask))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_clock() -> float:
    """CPU seconds of the computation: this thread's when torch runs single-threaded (other
    threads of the process, e.g. Ray's, do not count), else the whole process's."""
    return time.thread_time() if torch.get_num_threads() == 1 else time.process_time()


@torch.no_grad()
def _encode_pass(model: ELMM, batches: Sequence[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """Wall and CPU seconds of encoding ``batches``."""
    device = next(model.parameters()).device
    _sync(device)
    wall, cpu = time.perf_counter(), _cpu_clock()
    for batch in batches:
        model.encode_queries({k: v.to(device) for k, v in batch.items()})
    _sync(device)
    return time.perf_counter() - wall, _cpu_clock() - cpu


def compare_latency(models: dict[str, ELMM], batches: Sequence[dict[str, torch.Tensor]],
                    repeats: int = 7, warmup: int = 1) -> dict[str, dict]:
    """Query-encoding time of each model, ms per pass over ``batches``: wall clock (best
    and median of ``repeats``) and CPU time (median). The models take turns in every
    repeat so that machine load affects them alike. On a shared CPU, CPU time is the
    stable measure (waiting for a core does not count); on a GPU use the wall clock."""
    states = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    wall: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}
    try:
        for step in range(warmup + repeats):
            for name, model in models.items():
                elapsed, used = _encode_pass(model, batches)
                if step >= warmup:
                    wall[name].append(1000 * elapsed)
                    cpu[name].append(1000 * used)
    finally:
        for name, m in models.items():
            m.train(states[name])
    queries = sum(len(b["qrels"]) if "qrels" in b else 0 for b in batches)
    return {name: {"min_ms": min(wall[name]), "median_ms": statistics.median(wall[name]),
                   "runs_ms": wall[name], "cpu_ms": statistics.median(cpu[name]),
                   "cpu_runs_ms": cpu[name], "queries": queries} for name in models}


def paired_speedup(base_runs_ms: Sequence[float], runs_ms: Sequence[float]) -> float:
    """Median over repeats of ``base / model`` time (pairs timed back to back)."""
    return statistics.median(b / m for b, m in zip(base_runs_ms, runs_ms))


@torch.no_grad()
def peak_forward_memory_mb(model: ELMM, batch: dict[str, torch.Tensor]) -> float | None:
    """Peak of the memory a query-encoding forward allocates on top of what it starts
    with (activations and temporaries, not the weights), MiB.

    CUDA: ``max_memory_allocated`` minus the allocation before the call. CPU: the running
    sum, in time order, of the allocations and frees that the PyTorch profiler records
    (``profile_memory=True``): deterministic, unlike RSS. ``None`` if nothing is recorded."""
    from torch.profiler import ProfilerActivity, profile

    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    was_training = model.training
    model.eval()
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            model.encode_queries(batch)
            torch.cuda.synchronize(device)
            return (torch.cuda.max_memory_allocated(device) - before) / 2**20
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model.encode_queries(batch)
        events = sorted(prof.events(), key=lambda e: e.time_range.start)
        current = peak = 0
        for event in events:
            current += event.self_cpu_memory_usage
            peak = max(peak, current)
        return peak / 2**20 if events else None
    finally:
        model.train(was_training)


def parameter_mb(model: ELMM) -> float:
    """Memory of the model's parameters, MiB (LoRA adapters excluded)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if ".lora_" not in n) / 2**20


# --- rows, tables and plots ---------------------------------------------------------------------


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (``None`` without values: valid JSON)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(rows: Sequence[dict]) -> list[dict]:
    """Average the rows of each (method, ratio) over seeds; keep the spread of the metrics.

    A row: ``method, ratio, seed, llm_params, total_params, latency_ms, speedup,
    peak_mem_mb, pre_ft {metrics}, post_ft {metrics}, retained_hits1``."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], float(row["ratio"])), []).append(row)
    out = []
    for (method, ratio), members in groups.items():
        merged: dict = {"method": method, "ratio": ratio,
                        "seeds": [m.get("seed") for m in members], "runs": len(members)}
        if members[0].get("label"):
            merged["label"] = members[0]["label"]
        for key in ("llm_params", "total_params", "latency_ms", "latency_median_ms", "cpu_ms",
                    "speedup", "speedup_wall", "speedup_paired", "peak_mem_mb",
                    "retained_hits1", "removed_share"):
            values = [m.get(key) for m in members if m.get(key) is not None]
            merged[key], merged[key + "_std"] = _mean_std(values)
        for phase in ("pre_ft", "post_ft"):
            merged[phase] = {}
            for metric in METRIC_KEYS:
                values = [m[phase][metric] for m in members
                          if m.get(phase) and metric in m[phase]]
                if values:
                    mean, std = _mean_std(values)
                    merged[phase][metric] = mean
                    merged[phase][metric + "_std"] = std
        out.append(merged)
    order = {"none": 0, "finetune-only": 1, "knowledge": 2, "magnitude": 3, "random": 4,
             "attention": 5}
    return sorted(out, key=lambda r: (r["ratio"] > 0, r["ratio"], order.get(r["method"], 9)))


def _fmt(value: float | None, digits: int = 3, std: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:.{digits}f}"
    if std is not None and not math.isnan(std) and std > 0:
        text += f" ± {std:.{digits}f}"
    return text


def _present(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def _percent(value: float | None, std: float | None = None) -> str:
    if value is None or math.isnan(value):
        return "-"
    text = f"{100 * value:.1f}%"
    if std is not None and not math.isnan(std) and std > 0:
        text += f" ± {100 * std:.1f}"
    return text


def _times(value: float | None, std: float | None = None) -> str:
    return _fmt(value, 2, std) + "x" if _present(value) else "-"


def _millions(value: float | None) -> str:
    return f"{value / 1e6:.2f}M" if _present(value) else "-"


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table of :func:`summarise` rows (Table 1 of 002, with our measurements)."""
    head = ("| Method | Compression | LLM params | Total params | Latency (ms) | Speedup | "
            "Wall speedup | Peak act. mem (MB) | MRR (pruned) | Hits@1 (pruned) | MRR (+FT) | "
            "Hits@1 (+FT) | Type viol. (+FT) | Retained Hits@1 |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        pre, post = r.get("pre_ft", {}), r.get("post_ft", {})
        compression = f"{100 * r['ratio']:.0f}%"
        if r["method"] == "attention":
            compression = r.get("label", compression)
        lines.append("| " + " | ".join([
            {"none": "Full model", "finetune-only": "Full model + FT"}.get(r["method"],
                                                                          r["method"]),
            compression,
            _millions(r.get("llm_params")),
            _millions(r.get("total_params")),
            _fmt(r.get("latency_ms"), 1),
            _times(r.get("speedup"), r.get("speedup_std")),
            _times(r.get("speedup_wall"), r.get("speedup_wall_std")),
            _fmt(r.get("peak_mem_mb"), 1),
            _fmt(pre.get("mrr")),
            _fmt(pre.get("hits@1"), 3, pre.get("hits@1_std")),
            _fmt(post.get("mrr"), 3, post.get("mrr_std")),
            _fmt(post.get("hits@1"), 3, post.get("hits@1_std")),
            _fmt(post.get("type_violation")),
            _percent(r.get("retained_hits1"), r.get("retained_hits1_std")),
        ]) + " |")
    return "\n".join(lines)


def format_attention_table(layers: Sequence[dict]) -> str:
    """Per-layer table of attention pruning: similarity and reconstruction errors of plain
    removal vs the compensation, as Frobenius norm and as squared error (MSE)."""
    lines = ["| Layer | Cos. similarity | Error removal (Fro) | Error compensated (Fro) | "
             "Reduction (Fro) | Reduction (MSE) | Held-out red. (Fro) | Held-out red. (MSE) "
             "| Tokens |", "|" + "---|" * 9]

    def mse_reduction(e: dict) -> float:
        return 1 - e["compensated_mse"] / e["removal_mse"] if e["removal_mse"] else 0.0

    for layer in layers:
        e = layer["errors"]
        held = layer.get("holdout_errors") or {}
        lines.append(
            f"| {layer['layer']} | {_fmt(layer['similarity'])} | {_fmt(e['removal_fro'], 2)} "
            f"| {_fmt(e['compensated_fro'], 2)} | {_percent(e['reduction'])} | "
            f"{_percent(mse_reduction(e))} | "
            f"{_percent(held['reduction']) if held else '-'} | "
            f"{_percent(mse_reduction(held)) if held else '-'} | {e['tokens']} |")
    return "\n".join(lines)


def plot_hits_vs_speedup(rows: Sequence[dict], path: str | Path,
                         title: str = "Hits@1 vs speedup") -> Path:
    """PNG: Hits@1 after fine-tuning against measured speedup, one series per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    methods = sorted({r["method"] for r in rows})
    for method in methods:
        pts = sorted(((r["speedup"], r["post_ft"]["hits@1"],
                       r["post_ft"].get("hits@1_std") or 0.0, r) for r in rows
                      if r["method"] == method and _present(r.get("speedup"))
                      and _present(r.get("post_ft", {}).get("hits@1"))),
                     key=lambda p: p[0])
        if not pts:
            continue
        xs, ys, es = [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]
        marker = "*" if method in ("none", "finetune-only") else "o"
        label = {"none": "unpruned", "finetune-only": "unpruned + FT"}.get(method, method)
        ax.errorbar(xs, ys, yerr=es, marker=marker, capsize=3, label=label,
                    linestyle="-" if len(xs) > 1 else "none")
        for x, y, _, r in pts:
            if method not in ("none", "finetune-only"):
                ax.annotate(r.get("label") or f"{100 * r['ratio']:.0f}%", (x, y), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("query-encoding speedup vs unpruned (x)")
    ax.set_ylabel("Hits@1 after fine-tuning")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render_markdown(payload: dict, title: str = "Pruning report") -> str:
    """The whole ``prune_report.md``: settings, main table, attention layers, notes."""
    parts = [f"# {title}", ""]
    if payload.get("settings"):
        parts += ["Settings: " + ", ".join(f"`{k}={v}`" for k, v in
                                           payload["settings"].items()), ""]
    parts += [format_table(payload["rows"]), ""]
    for entry in payload.get("attention", []):
        parts += [f"## Attention pruning: {entry.get('label', '')}", "",
                  format_attention_table(entry["layers"]), ""]
    for note in payload.get("notes", []):
        parts.append(f"- {note}")
    return "\n".join(parts).rstrip() + "\n"


def write_report(directory: str | Path, payload: dict, *, name: str = REPORT_NAME,
                 title: str = "Pruning report") -> dict[str, Path]:
    """Write ``<name>.json``, ``<name>.md`` and ``<name>.png`` into ``directory``.

    ``payload``: ``rows`` (:func:`summarise` output), optional ``runs`` (the raw rows),
    ``attention`` (per-run layer reports), ``settings`` and ``notes``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"json": directory / f"{name}.json", "md": directory / f"{name}.md",
             "png": directory / f"{name}.png"}
    write_json_atomic(paths["json"], payload)
    paths["md"].write_text(render_markdown(payload, title))
    plot_hits_vs_speedup(payload["rows"], paths["png"], title)
    return paths

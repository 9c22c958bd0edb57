"""The accuracy/cost trade-off of a sweep: Pareto front, results table and plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path


def parse_objectives(objectives: Sequence[str]) -> list[tuple[str, str]]:
    """``["val_mrr:max", ...]`` -> ``[("val_mrr", "max"), ...]``."""
    return [tuple(o.split(":", 1)) for o in objectives]  # type: ignore[misc]


def _value(row: dict, metric: str) -> float | None:
    value = row.get(metric)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def dominates(a: dict, b: dict, objectives: Sequence[tuple[str, str]]) -> bool:
    """``a`` is at least as good as ``b`` in every objective and better in one."""
    better = False
    for metric, mode in objectives:
        x, y = _value(a, metric), _value(b, metric)
        if mode == "min":
            x, y = -x, -y  # type: ignore[operator]
        if x < y:  # type: ignore[operator]
            return False
        better = better or x > y  # type: ignore[operator]
    return better


def pareto_front(rows: Sequence[dict], objectives: Sequence[tuple[str, str]]) -> list[int]:
    """Indices of the rows no other row dominates, among the rows that have every objective
    (trials stopped early have no cost figures and are left out)."""
    complete = [i for i, r in enumerate(rows)
                if all(_value(r, m) is not None for m, _ in objectives)]
    return [i for i in complete
            if not any(dominates(rows[j], rows[i], objectives) for j in complete if j != i)]


def best_row(rows: Sequence[dict], metric: str, mode: str) -> int | None:
    """Index of the best row by one metric (ties: the first)."""
    scored = [(i, _value(r, metric)) for i, r in enumerate(rows)]
    scored = [(i, v) for i, v in scored if v is not None]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda iv: iv[1])[0]


def plot_front(rows: Sequence[dict], front: Sequence[int], path: str | Path,
               metric: str = "val_mrr",
               costs: Sequence[str] = ("visual_tokens", "latency_ms", "llm_params")) -> Path:
    """``metric`` against each cost, every trial a dot, the front highlighted (a PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, len(costs), figsize=(4.2 * len(costs), 3.6), squeeze=False)
    on_front = set(front)
    for ax, cost in zip(axes[0], costs):
        points = [(i, _value(r, cost), _value(r, metric)) for i, r in enumerate(rows)]
        points = [(i, x, y) for i, x, y in points if x is not None and y is not None]
        others = [(x, y) for i, x, y in points if i not in on_front]
        best = sorted((x, y) for i, x, y in points if i in on_front)
        if others:
            ax.scatter(*zip(*others), color="tab:gray", alpha=0.6, label="trial")
        if best:
            ax.plot(*zip(*best), "o-", color="tab:red", label="Pareto front")
        ax.set_xlabel(cost)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

"""Human- and machine-readable reports of :func:`elmm_ray.eval.ranking.evaluate_ranking`."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from elmm_ray.tables import format_table


def _metric_rows(metrics: dict) -> list[tuple[str, dict]]:
    rows = [(name, metrics[name]) for name in ("overall", "tail", "head") if name in metrics]
    for category, by_direction in metrics.get("categories", {}).items():
        for direction in ("tail", "head", "both"):
            if direction in by_direction:
                rows.append((f"{category} {direction}", by_direction[direction]))
    return rows


def _hits_keys(metrics: dict) -> list[str]:
    keys = {key for _, row in _metric_rows(metrics) for key in row if key.startswith("hits@")}
    return sorted(keys, key=lambda key: int(key.split("@", 1)[1]))


def _cell(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def format_metrics_table(metrics: dict) -> str:
    """Aligned text table: one row per subset (overall, tail, head, category x direction)."""
    hits = _hits_keys(metrics)
    header = ["subset", "queries", "MRR", "MR", *[f"Hits@{k.split('@')[1]}" for k in hits],
              "type-viol"]
    rows = [[name, str(row.get("count", "-")), _cell(row.get("mrr"), 4), _cell(row.get("mr"), 1),
             *[_cell(row.get(key), 4) for key in hits], _cell(row.get("type_violation"), 4)]
            for name, row in _metric_rows(metrics)]
    return format_table(rows, header)


def _jsonable(value: Any) -> Any:
    """Plain JSON values: numpy scalars/arrays to Python, NaN/inf to null."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics_json(metrics: dict, path: str | Path) -> Path:
    """Write ``metrics`` as strict JSON (NaN as null), creating parent folders; through a
    temporary file and a rename, so a reader never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_jsonable(metrics), indent=2, sort_keys=False) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)
    return path


BY_RELATION_ROWS = 12  # at most this many relations get a console table; more: the file


def relation_table(metrics_file: str | Path | None, k: int, split: str,
                   display: Callable[[str | Path], str] = str) -> str:
    """Hits@k of every relation and direction from the eval stage's metrics file (a table
    for up to ``BY_RELATION_ROWS`` relations, else a line naming the file); ``""`` when the
    file has none (an older run). ``display``: how the file's path is shown (a remote run
    directory's URI)."""
    if not metrics_file or not Path(metrics_file).is_file():
        return ""
    relations = json.loads(Path(metrics_file).read_text()).get("relations") or []
    if not relations:
        return ""
    if len(relations) > BY_RELATION_ROWS:
        return (f"Hits@{k} of each of the {len(relations)} relations: "
                f"{display(metrics_file)}")

    def cell(entry: dict, direction: str) -> str:
        if direction not in entry:
            return "-"
        figures = entry[direction]
        value = figures.get(f"hits@{k}")
        return "-" if value is None else f"{value:.2f} ({figures['count']})"

    rows = [(e["relation"], cell(e, "tail"), cell(e, "head")) for e in relations]
    return format_table(rows, ["relation", "tail (queries)", "head (queries)"],
                        title=f"Hits@{k} by relation ({split})")

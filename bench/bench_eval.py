"""Speed of filtered ranking: FB15k-237 test queries (both directions) against all entities.

Random query and entity vectors (float32, seeded) stand in for a model, so this measures the
evaluation machinery alone: one matrix product per batch, filtering with the real filter
index (train + valid + test), tie-aware ranks, top-1 and the metric breakdown.

    .venv/bin/python bench/bench_eval.py            # full: 40,932 queries x 14,541 x 4096
    .venv/bin/python bench/bench_eval.py --quick    # small smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from elmm_ray.data.kg import load_kg  # noqa: E402
from elmm_ray.eval.ranking import evaluate_ranking, rank_with_vectors  # noqa: E402

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "FB15k-237"
DEFAULT_OUTPUT = REPO_ROOT / "bench" / "results" / "eval_speed.json"


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_average() -> float:
    """One-minute load average (other processes share the cores); NaN where unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="FB15k-237 folder")
    parser.add_argument("--width", type=int, default=None, help="vector width (4096)")
    parser.add_argument("--batch-size", type=int, default=512, help="queries per matmul")
    parser.add_argument("--num-queries", type=int, default=None,
                        help="rank only the first N queries (default or 0: all test queries, "
                        "both directions)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--quick", action="store_true",
                        help="small run: width 256, 2,048 queries (unless given)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results path")
    args = parser.parse_args(argv)
    if args.width is None:
        args.width = 256 if args.quick else 4096
    if args.num_queries is None:
        args.num_queries = 2048 if args.quick else 0
    return args


def _shown(value: object) -> str:
    """Arguments as saved: paths relative to the repository (no machine paths in results)."""
    if isinstance(value, Path):
        return os.path.relpath(value.resolve(), Path(__file__).resolve().parents[1])
    return str(value)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.data / "train.tsv").is_file():
        print(f"FB15k-237 not found at {args.data} (expected train.tsv, dev.tsv, test.tsv); "
              "pass --data PATH", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    kg = load_kg(args.data)
    load_seconds = time.perf_counter() - start
    start = time.perf_counter()
    filter_index = kg.filter_index()
    filter_seconds = time.perf_counter() - start

    queries = kg.queries("test")
    if args.num_queries:
        queries = queries[: args.num_queries]
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    entity_vectors = torch.randn(kg.num_entities, args.width, generator=generator)
    query_vectors = torch.randn(len(queries), args.width, generator=generator)
    vectors_seconds = time.perf_counter() - start

    load_before = load_average()
    start, cpu_start = time.perf_counter(), cpu_seconds()
    result = rank_with_vectors(query_vectors, entity_vectors, queries, filter_index,
                               batch_size=args.batch_size)
    rank_seconds = time.perf_counter() - start
    rank_cpu_seconds = cpu_seconds() - cpu_start
    load_after = load_average()
    start = time.perf_counter()
    metrics = evaluate_ranking(result.ranks, result.top1, queries, kg.num_relations,
                               kg.relation_categories, kg.triples["train"])
    metrics_seconds = time.perf_counter() - start

    score_batch_bytes = min(args.batch_size, len(queries)) * kg.num_entities * 4
    figures = {
        "queries": int(len(queries)),
        "entities": kg.num_entities,
        "width": args.width,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "kg_load_s": round(load_seconds, 3),
        "filter_index_s": round(filter_seconds, 3),
        "random_vectors_s": round(vectors_seconds, 3),
        "ranking_s": round(rank_seconds, 3),
        "ranking_cpu_s": round(rank_cpu_seconds, 3),
        "load_avg_1min_before_after": [load_before, load_after],
        "queries_per_s": round(len(queries) / rank_seconds, 1),
        "gflops_per_s": round(2 * len(queries) * kg.num_entities * args.width
                              / rank_seconds / 1e9, 1),
        "metrics_s": round(metrics_seconds, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "query_vectors_mb": round(query_vectors.nbytes / 2**20, 1),
        "entity_vectors_mb": round(entity_vectors.nbytes / 2**20, 1),
        "score_batch_mb": round(score_batch_bytes / 2**20, 1),
        "goal_ranking_s": 60.0,
        "random_mrr": round(metrics["overall"]["mrr"], 6),
        "random_mr": round(metrics["overall"]["mr"], 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
    }
    width = max(len(key) for key in figures)
    print(f"filtered ranking benchmark ({'quick' if args.quick else 'full'})")
    for key, value in figures.items():
        print(f"  {key.ljust(width)}  {value}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"args": {k: _shown(v) for k, v in vars(args).items()},
                                       "figures": figures}, indent=2) + "\n")
    print(f"saved {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

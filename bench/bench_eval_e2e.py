"""Evaluation end to end (query encoding through the model + filtered ranking) on the
FB15k-237 test set shape, with the tiny model: in this process, and on 1 and 2 Ray workers
(the eval stage's path with ``train.backend=ray``: each worker builds the model and ranks a
slice of the queries; the driver gathers the ranks).

The model is the tiny preset, untrained (seeded): speed does not depend on the weights. The
real FB15k-237 KG (14,541 entities, 20,466 test triples -> 40,932 queries) with entity texts;
no images (``images.max_images_per_entity=0``: MVTC still runs its tokens over empty
features, so the prompt has the MVTC tokens of the trained model).

    .venv/bin/python bench/bench_eval_e2e.py                 # all 40,932 queries
    .venv/bin/python bench/bench_eval_e2e.py --max-queries 2000   # per direction
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import SHARED_DATA, save  # noqa: E402
from elmm_ray.config import load_config  # noqa: E402
from elmm_ray.data.dataset import load_dataset  # noqa: E402
from elmm_ray.layout import RunLayout, absolute_paths  # noqa: E402
from elmm_ray.models.lora import save_trainable  # noqa: E402
from elmm_ray.ray_session import init_ray  # noqa: E402
from elmm_ray.stages.train import evaluate  # noqa: E402
from elmm_ray.tables import format_table  # noqa: E402
from elmm_ray.train.context import build_context, load_trained_context  # noqa: E402
from elmm_ray.train.ray_eval import evaluate_on_ray  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED_DATA / "FB15k-237"))
    parser.add_argument("--max-queries", type=int, default=0,
                        help="test triples per direction (0 = all 20,466)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--output", default="eval_e2e")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.data, "train.tsv")):
        print(f"FB15k-237 not found at {args.data}; pass --data PATH", file=sys.stderr)
        return 2
    run_dir = tempfile.mkdtemp(prefix="elmm_eval_e2e_")
    cfg = absolute_paths(load_config("configs/demo.yaml", [
        f"run_dir={run_dir}", "dataset.name=fb15k237", f"dataset.path={args.data}",
        "images.max_images_per_entity=0", "model.preset=tiny", "train.backend=ray",
        "train.threads_per_worker=1", "train.cpus_per_worker=1", "ray.num_cpus=2",
        f"eval.batch_size={args.batch_size}",
        f"eval.max_queries={args.max_queries or 'null'}"]))
    kg = load_dataset(cfg)
    start = time.perf_counter()
    save_trainable(build_context(cfg, kg).model, RunLayout.of(cfg).trained_model)
    setup_s = time.perf_counter() - start

    runs: dict[str, dict] = {}

    def record(name: str, seconds: float, metrics: dict, load_s: float = 0.0) -> None:
        runs[name] = {"seconds": round(seconds, 2), "model_load_s": round(load_s, 2),
                      "queries": metrics["num_queries"],
                      "queries_per_s": round(metrics["num_queries"] / seconds, 1),
                      "mrr": metrics["overall"]["mrr"]}
        print(f"{name}: {seconds:.1f} s", flush=True)

    for threads in (1, 2):
        torch.set_num_threads(threads)
        start = time.perf_counter()
        ctx = load_trained_context(cfg, kg)
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        metrics = evaluate(cfg, kg, ctx)
        record(f"this process, {threads} thread(s)", time.perf_counter() - start, metrics,
               load_s)
        del ctx
    torch.set_num_threads(1)
    init_ray(cfg.ray)  # Ray's own start-up is not part of an evaluation
    for workers in (1, 2):  # wall time includes each worker's start and model build
        start = time.perf_counter()
        metrics = evaluate_on_ray(cfg, kg, workers=workers)
        record(f"Ray, {workers} worker(s)", time.perf_counter() - start, metrics)
    mrrs = {round(r["mrr"], 9) for r in runs.values()}
    one, two = runs["Ray, 1 worker(s)"], runs["Ray, 2 worker(s)"]
    figures = {
        "queries": one["queries"], "entities": kg.num_entities, "setup_s": round(setup_s, 1),
        "runs": runs, "ray_2_vs_1_workers": round(one["seconds"] / two["seconds"], 2),
        "same_metrics_everywhere": len(mrrs) == 1,
        "load_average_end": os.getloadavg()[0],
        "targets": {"end_to_end_here_s": 120.0, "ray_2_vs_1_workers": 1.6},
    }
    rows = [(name, f"{r['seconds']:.1f}", f"{r['queries_per_s']:,.0f}", f"{r['mrr']:.6f}")
            for name, r in runs.items()]
    print(format_table(rows, ["run", "seconds", "queries/s", "MRR"],
                       title=f"evaluation end to end: {one['queries']:,} queries x "
                             f"{kg.num_entities:,} entities (tiny model)"))
    print(f"2 Ray workers vs 1: {figures['ray_2_vs_1_workers']}x; same metrics in every run: "
          f"{figures['same_metrics_everywhere']}")
    save(args.output, {"args": {k: str(v) for k, v in vars(args).items() if k != "data"},
                       "figures": figures})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Memory under load: peak RSS of (a) feature extraction (the Ray Data pipeline, driver and
every Ray process summed: ``bench_extract.TreeRss``) over ~2,500 and ~20,000 synthetic
images with the tiny tower, and (b) evaluation (in one process, ``model.entity_repr=table``,
the tiny model, untrained and seeded) over WN18's 40,943 entities with 1,000 queries per
direction and with every test query. Each measurement runs in a fresh subprocess. Goal:
flat in dataset size (the larger run's peak within 1.3x of the smaller one's).

    .venv/bin/python bench/bench_memory.py [--quick] [--skip-extract] [--skip-eval]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import REPO_ROOT, SHARED_DATA, save  # noqa: E402

from elmm_ray.tables import format_table  # noqa: E402

GOAL = 1.3


def eval_one(data: str, max_queries: int) -> dict:
    """One evaluation of WN18's test split (in this process); its peak RSS."""
    import torch

    from elmm_ray.config import load_config
    from elmm_ray.data.dataset import load_dataset
    from elmm_ray.layout import absolute_paths
    from elmm_ray.stages.train import evaluate
    from elmm_ray.train.context import build_context

    torch.set_num_threads(1)
    cfg = absolute_paths(load_config(REPO_ROOT / "configs" / "demo.yaml", [
        f"run_dir={tempfile.mkdtemp(prefix='elmm_mem_eval_')}", "dataset.name=wn18",
        f"dataset.path={data}", "images.max_images_per_entity=0", "model.preset=tiny",
        "model.entity_repr=table", "train.backend=local", "eval.batch_size=256",
        f"eval.max_queries={max_queries or 'null'}"]))
    kg = load_dataset(cfg)
    ctx = build_context(cfg, kg)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    metrics = evaluate(cfg, kg, ctx)
    return {"entities": kg.num_entities, "queries": metrics["num_queries"],
            "seconds": round(time.perf_counter() - start, 1), "rss_before_eval_mb": before,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "mrr": metrics["overall"]["mrr"]}


def in_subprocess(args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", RAY_DATA_USE_DATASOURCE_V2="0")
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{args} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1/8 of the sizes")
    parser.add_argument("--skip-extract", action="store_true")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--eval-one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.eval_one:
        print("RESULT " + json.dumps(eval_one(args.eval_one[0], int(args.eval_one[1]))))
        return 0
    start = time.perf_counter()
    figures: dict = {"goal_ratio": GOAL}
    rows = []
    if not args.skip_extract:
        import bench_extract as be

        work = Path(tempfile.mkdtemp(prefix="elmm_mem_extract_"))
        runs = []
        for entities in ((125, 1000) if args.quick else (1000, 8000)):
            spec = {**be.prepare(work, "tiny", entities), "mode": "ray", "actors": 1,
                    "batch_size": 32, "part_rows": 64, "work": str(work)}
            r = be.measure(spec)
            runs.append({"images": spec["images"], **{k: r[k] for k in (
                "seconds", "peak_rss_mb", "baseline_rss_mb", "processes_at_peak", "done")}})
            rows.append((f"extract {spec['images']:,} images", f"{r['seconds']:.0f}",
                         f"{r['peak_rss_mb']:,.0f}"))
            print(rows[-1], flush=True)
        figures["extract"] = {"runs": runs,
                              "ratio": runs[1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]}
    if not args.skip_eval:
        data = SHARED_DATA / "WN18"
        runs = []
        for queries in ((200, 1000) if args.quick else (1000, 0)):
            r = in_subprocess(["--eval-one", str(data), str(queries)])
            runs.append(r)
            rows.append((f"eval WN18 {r['entities']:,} entities, {r['queries']:,} queries",
                         f"{r['seconds']:.0f}", f"{r['peak_rss_mb']:,.0f}"))
            print(rows[-1], flush=True)
        figures["eval"] = {"runs": runs,
                           "ratio": runs[1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]}
    print(format_table(rows, ["measurement", "seconds", "peak RSS MB"],
                       title="memory under load"))
    for name in ("extract", "eval"):
        if name in figures:
            print(f"{name}: larger / smaller peak RSS = {figures[name]['ratio']:.2f} "
                  f"(goal <= {GOAL})")
    save("memory" + ("_quick" if args.quick else ""), {
        "command": "python bench/bench_memory.py" + (" --quick" if args.quick else ""),
        "seconds": round(time.perf_counter() - start, 1), "figures": figures})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

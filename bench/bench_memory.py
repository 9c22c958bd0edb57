"""Memory under load: peak RSS of (a) feature extraction (the Ray Data pipeline, driver and
every Ray process summed: ``bench_extract.TreeRss``) over ~2,500 and ~20,000 synthetic
images with the tiny tower, and (b) evaluation (in one process, ``model.entity_repr=table``,
the tiny model, untrained and seeded) of a 10,000-entity slice of WN18 (every test query of
it) and of WN18's 40,943 entities with 1,000 queries per direction and with every test
query. Each measurement runs in a fresh subprocess. Goal:
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

from common import REPO_ROOT, RESULTS, SHARED_DATA, save  # noqa: E402

from elmm_ray.tables import format_table  # noqa: E402

GOAL = 1.3


def eval_one(data: str, max_queries: int) -> dict:
    """One evaluation of WN18's (or a slice's) test split in this process; its peak RSS."""
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


def wn18_slice(src: Path, dst: Path, entities: int) -> Path:
    """WN18 restricted to the first ``entities`` of ``entity2text.txt`` (triples with both
    ends among them), written to ``dst``: the same data at a smaller entity count."""
    dst.mkdir(parents=True, exist_ok=True)
    lines = (src / "entity2text.txt").read_text().splitlines()[:entities]
    keep = {line.split("\t", 1)[0] for line in lines}
    (dst / "entity2text.txt").write_text("\n".join(lines) + "\n")
    (dst / "relation2text.txt").write_text((src / "relation2text.txt").read_text())
    for split in ("train.tsv", "dev.tsv", "test.tsv"):
        rows = [r for r in (src / split).read_text().splitlines()
                if r and r.split("\t")[0] in keep and r.split("\t")[2] in keep]
        (dst / split).write_text("\n".join(rows) + "\n")
    return dst


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
        part = wn18_slice(data, Path(tempfile.mkdtemp(prefix="elmm_mem_wn18_")),
                          2500 if args.quick else 10000)
        runs = []
        # an entity slice with every test query of it, then all entities with a query
        # sample and with every test query (the last is compared with the first)
        plan = (((part, 0), (data, 200), (data, 1000)) if args.quick else
                ((part, 0), (data, 1000), (data, 0)))
        for source, queries in plan:
            r = in_subprocess(["--eval-one", str(source), str(queries)])
            runs.append(r)
            rows.append((f"eval WN18 {r['entities']:,} entities, {r['queries']:,} queries",
                         f"{r['seconds']:.0f}", f"{r['peak_rss_mb']:,.0f}"))
            print(rows[-1], flush=True)
        figures["eval"] = {"runs": runs,
                           "ratio": runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]}
    print(format_table(rows, ["measurement", "seconds", "peak RSS MB"],
                       title="memory under load"))
    for name in ("extract", "eval"):
        if name in figures:
            print(f"{name}: larger / smaller peak RSS = {figures[name]['ratio']:.2f} "
                  f"(goal <= {GOAL})")
    name = "memory" + ("_quick" if args.quick else "")
    command = "python bench/bench_memory.py" + (" --quick" if args.quick else "") + (
        " --skip-extract" if args.skip_extract else "") + (
        " --skip-eval" if args.skip_eval else "")
    previous = RESULTS / f"{name}.json"
    if (args.skip_extract or args.skip_eval) and previous.is_file():
        # keep the skipped measurement of the last run, labelled with its command and date
        old = json.loads(previous.read_text())
        for part in ("extract", "eval"):
            if part not in figures and part in old["figures"]:
                kept = old["figures"][part]
                figures[part] = {**kept, "measured_by": kept.get("measured_by", old["command"]),
                                 "date": kept.get("date", old["machine"]["date"])}
    save(name, {"command": command, "seconds": round(time.perf_counter() - start, 1),
                "figures": figures})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Ray Train + DeepSpeed on CPU: throughput with 1 vs 2 workers, per-rank memory of
parameters + optimizer state under ZeRO-2 vs ZeRO-3, and the demo's wall time by stage.

    python bench/bench_train.py [--steps 40] [--skip-demo]

Throughput is samples/s of the training loop alone (validation and Ray start-up
excluded), read from the run's metrics. Memory is what rank 0 holds after the first
optimizer step (full fine-tuning of a mid-size model, so the partition is visible).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, save  # noqa: E402

from elmm_ray.config import RayConfig, load_config  # noqa: E402
from elmm_ray.data.dataset import load_dataset  # noqa: E402
from elmm_ray.data.shards import pack_images  # noqa: E402
from elmm_ray.layout import RunLayout, absolute_paths  # noqa: E402
from elmm_ray.pipeline import run_all  # noqa: E402
from elmm_ray.ray_session import init_ray  # noqa: E402
from elmm_ray.stages import run_stage  # noqa: E402
from elmm_ray.tables import format_table  # noqa: E402
from elmm_ray.train.trainer import train_ray  # noqa: E402

DEMO = str(REPO_ROOT / "configs" / "demo.yaml")
# The random tiny tower, which results/train.json was measured with (the demo's preset then).
TOWER = "model.preset=tiny"


def _train(root: Path, name: str, data: Path, *overrides: str) -> dict:
    run_dir = root / name
    cfg = load_config(DEMO, [f"run_dir={run_dir}", TOWER, f"dataset.path={data / 'data'}",
                             "dataset.name=synth", f"images.shard_dir={data / 'shards'}",
                             *overrides])
    summary = train_ray(cfg, load_dataset(cfg))
    history = summary["history"]
    last = history[-1]
    return {"steps": last["step"], "workers": last["workers"],
            "train_seconds": last["train_seconds"],
            "samples_per_s": last["step"] * cfg.train.global_batch_size
            / last["train_seconds"],
            "param_mb_rank0": history[0].get("param_mb"),
            "optimizer_mb_rank0": history[0].get("optimizer_mb")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip-demo", action="store_true", help="skip the demo timing")
    args = parser.parse_args()
    init_ray(RayConfig(num_cpus=2))
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        data_cfg = absolute_paths(load_config(DEMO, [f"run_dir={root / 'data'}", TOWER]))
        run_stage("synth", data_cfg, show_progress=False)
        kg = load_dataset(data_cfg)
        pack_images(kg, root / "data" / "shards", use_ray=False)
        steps = [f"train.max_steps={args.steps}", f"train.eval_every={args.steps}",
                 "train.val_max_queries=50"]
        for workers in (1, 2):
            results[f"workers_{workers}"] = _train(
                root, f"w{workers}", root / "data", *steps, f"train.num_workers={workers}")
        full_ft = ["lora.enabled=false", "model.llm_hidden=256", "model.llm_layers=4",
                   "model.llm_intermediate=1024", "model.llm_heads=8", "model.llm_kv_heads=8",
                   "train.max_steps=4", "train.eval_every=4", "train.val_max_queries=10",
                   "train.global_batch_size=16", "train.num_workers=2"]
        for stage in (2, 3):
            results[f"zero{stage}"] = _train(root, f"z{stage}", root / "data", *full_ft,
                                             f"deepspeed.zero_stage={stage}")
        if not args.skip_demo:
            demo_dir = root / "demo"
            cfg = load_config(DEMO, [f"run_dir={demo_dir}", TOWER])
            start = time.perf_counter()
            demo = run_all(cfg, show_progress=False)
            results["demo"] = {"total_seconds": time.perf_counter() - start,
                               "stages": demo["timings"],
                               "metrics": demo["metrics"]["overall"]}
            print(json.dumps(RunLayout(demo_dir).read_manifest("train"), indent=1)[:400])

    one, two = results["workers_1"], results["workers_2"]
    rows = [(f"{w} worker(s)", r["steps"], f"{r['train_seconds']:.1f}",
             f"{r['samples_per_s']:.1f}") for w, r in ((1, one), (2, two))]
    print(format_table(rows, ["run", "steps", "train s", "samples/s"],
                       title="throughput on CPU (tiny demo model, LoRA, ZeRO-2)"))
    scaling = two["samples_per_s"] / one["samples_per_s"]
    print(f"2 vs 1 workers: {scaling:.2f}x samples/s (2 cores in all)")
    mem_rows = [(f"ZeRO-{s}", f"{results[f'zero{s}']['param_mb_rank0']:.2f}",
                 f"{results[f'zero{s}']['optimizer_mb_rank0']:.2f}") for s in (2, 3)]
    print(format_table(mem_rows, ["stage", "params MB (rank 0)", "optimizer MB (rank 0)"],
                       title="per-rank memory, 2 workers, full fine-tuning"))
    if "demo" in results:
        stage_rows = [(k, f"{v:.1f}") for k, v in results["demo"]["stages"].items()]
        stage_rows.append(("total", f"{results['demo']['total_seconds']:.1f}"))
        print(format_table(stage_rows, ["stage", "seconds"], title="demo wall time by stage"))
    save("train", {"args": vars(args), "results": results, "scaling_2_over_1": scaling})


if __name__ == "__main__":
    main()

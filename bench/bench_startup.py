"""Where a Ray Train fit and a Ray Tune trial spend the time outside training, phase by phase.

    python bench/bench_startup.py [--repeats 2] [key=value ...]

- imports: each heavy module imported in a fresh interpreter (the cost every new Ray Train
  worker process pays), the least of ``--repeats``;
- Ray Train's floor: a ``TorchTrainer.fit`` of one worker whose function does nothing (the
  controller and worker group up to the worker process, the process's start, the shutdown);
- the project's fit (``train_ray`` on the tiny config, 1 and 2 workers, ZeRO-2): rank 0's
  start-up marks (``summary.json`` ``startup``; ``trainer.startup_phases``): the worker
  process, its imports, dataset, training queries, model, DeepSpeed engine, first step, shutdown;
- a Tune trial on Ray Train (one trial of the tiny sweep, as bench/bench_tune.py runs it): the
  trial's stages (entity init with an entity table, train) and the fit's phases inside it,
  next to the trial's time and its training time.

Saves bench/results/startup.json and prints a table. Figures are seconds on this machine;
the fixed cost of a fit is everything outside its training loop (``fixed``); ``cpu_seconds``
is what the whole machine spent busy during the fit (every process it started, Ray's own
included), steadier than its wall time on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, save  # noqa: E402

from elmm_ray.config import RayConfig, load_config  # noqa: E402
from elmm_ray.data.dataset import load_dataset  # noqa: E402
from elmm_ray.layout import RunLayout, absolute_paths  # noqa: E402
from elmm_ray.pipeline import pipeline_stages  # noqa: E402
from elmm_ray.ray_session import init_ray  # noqa: E402
from elmm_ray.stages import run_stages  # noqa: E402
from elmm_ray.tables import format_table  # noqa: E402
from elmm_ray.train.trainer import train_ray  # noqa: E402
from elmm_ray.tune.space import load_space  # noqa: E402
from elmm_ray.tune.sweep import run_sweep  # noqa: E402

DEMO = str(REPO_ROOT / "configs" / "demo.yaml")
TINY = ["model.preset=tiny-test", "dataset.synth.num_entities=120",
        "dataset.synth.max_images=2", "dataset.synth.image_size=32",
        "images.max_images_per_entity=2", "mvtc.heads=2", "train.epochs=1",
        "train.global_batch_size=16", "train.num_negatives=8", "train.val_max_queries=40",
        "eval.batch_size=64", "tune.latency_repeats=3", "train.backend=ray",
        "deepspeed.zero_stage=2", "train.cpus_per_worker=1"]
MODULES = ["ray", "torch", "ray.train.torch", "transformers", "peft", "deepspeed",
           "elmm_ray.train.loop"]


def import_seconds(module: str, repeats: int) -> float:
    code = ("import time; t = time.perf_counter(); import " + module +
            "; print(time.perf_counter() - t)")
    times = []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=REPO_ROOT, check=True,
                              env={"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu",
                                   "PYTHONPATH": str(REPO_ROOT)})
        times.append(float(done.stdout.strip().splitlines()[-1]))
    return round(min(times), 3)


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (user, nice, system, irq, softirq), so
    that a fit's cost counts every process it starts."""
    import psutil

    times = psutil.cpu_times()
    return sum(getattr(times, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq"))


def _noop(config: dict) -> None:
    import json as _json
    import time as _time

    import psutil

    with open(config["marks"], "w") as f:
        _json.dump({"process": psutil.Process().create_time(), "entered": _time.time()}, f)


def bare_fit(repeats: int) -> dict:
    """Ray Train's own floor: one worker, a function that only records when it ran."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    rows = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
            marks_file = Path(tmp) / "marks.json"
            trainer = TorchTrainer(
                _noop, train_loop_config={"marks": str(marks_file)},
                scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                torch_config=TorchConfig(backend="gloo"),
                run_config=RunConfig(storage_path=str(Path(tmp) / "storage")))
            busy, called = busy_cpu_seconds(), time.time()
            trainer.fit()
            returned = time.time()
            cpu = busy_cpu_seconds() - busy
            marks = json.loads(marks_file.read_text())
        rows.append({"to_worker_process": marks["process"] - called,
                     "worker_start": marks["entered"] - marks["process"],
                     "after_function": returned - marks["entered"],
                     "fit": returned - called, "cpu_seconds": cpu})
    return {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}


def project_fit(root: Path, workers: int, overrides: list[str]) -> dict:
    """One fresh fit of ``workers`` workers; its phases (``train_ray``'s ``startup``)."""
    cfg = absolute_paths(load_config(DEMO, [f"run_dir={root / f'fit{workers}'}", *TINY,
                                            f"train.num_workers={workers}", *overrides]))
    run_stages([s for s in pipeline_stages(cfg) if s in ("synth", "pack", "extract")], cfg,
               show_progress=False)
    kg = load_dataset(cfg)
    busy = busy_cpu_seconds()
    summary = train_ray(cfg, kg, show_progress=False)
    return {"workers": workers, "train_seconds": round(summary["train_seconds"], 3),
            **summary["startup"], "cpu_seconds": round(busy_cpu_seconds() - busy, 3)}


def tune_trial(root: Path, overrides: list[str]) -> dict:
    space_file = root / "space.yaml"
    space_file.write_text(json.dumps(
        {"params": {"mvtc.n_visual": {"type": "choice", "values": [4]}}}))
    cfg = absolute_paths(load_config(DEMO, [
        f"run_dir={root / 'sweep'}", *TINY, "train.num_workers=1", "tune.scheduler=none",
        # on Ray Train (tune.trial_backend=auto would train a one-worker trial locally)
        "tune.trial_backend=ray", "tune.search=grid", "tune.num_samples=1", *overrides]))
    result = run_sweep(cfg, load_space(space_file, cfg), show_progress=False)
    row = result.rows[0]
    layout = RunLayout(result.out_dir / "trials" / row["trial_id"])
    # The trial's own stages (entity_init only with model.entity_repr=table).
    stages = {name: m for name in ("entity_init", "train")
              if (m := layout.read_manifest(name)) is not None}
    train = stages["train"]
    out = {"trial_seconds": round(row["trial_seconds"], 3),
           "train_seconds": round(train["train_seconds"], 3),
           **{f"{name}_stage": round(m["seconds"], 3) for name, m in stages.items()},
           **{f"fit_{k}": v for k, v in train.get("startup_seconds", {}).items()}}
    # cost measurement (the final model rebuilt, latency, memory) and Tune's bookkeeping
    out["outside_stages"] = round(out["trial_seconds"] - sum(m["seconds"]
                                                             for m in stages.values()), 3)
    out["overhead_share"] = round(1 - out["train_seconds"] / out["trial_seconds"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="key=value for the fits and the trial")
    args = parser.parse_args()
    imports = {m: import_seconds(m, args.repeats) for m in MODULES}
    init_ray(RayConfig(num_cpus=2))
    floor = bare_fit(args.repeats)
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        fits = [project_fit(Path(tmp), w, args.overrides) for w in (1, 2)]
        trial = tune_trial(Path(tmp), args.overrides)
    payload = {"command": " ".join(["python bench/bench_startup.py", *sys.argv[1:]]),
               "imports_seconds": imports, "ray_train_floor": floor, "fits": fits,
               "tune_trial": trial}
    print(format_table([[m, f"{s:.2f}"] for m, s in imports.items()], ["module", "import s"]))
    phases = [k for k in fits[0] if k != "workers"]
    print(format_table([[k, f"{floor[k]:.2f}" if k in floor else "",
                         *[f"{f.get(k, 0):.2f}" for f in fits]] for k in phases],
                       ["phase", "floor", *[f"fit {f['workers']}w" for f in fits]]))
    print(format_table([[k, f"{v:.3f}"] for k, v in trial.items()], ["tune trial", "s"]))
    save("startup", payload)


if __name__ == "__main__":
    main()

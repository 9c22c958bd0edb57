"""Ray Tune sweep costs on the tiny config: per-trial overhead (Tune + Train start-up,
entity init, cost measurement) against training time, trials per hour, and the time saved
by sharing upstream stages (the sweep vs the same trials as independent pipeline runs).

    python bench/bench_tune.py [--backend ray|local] [--trials 4] [key=value ...]
    python bench/bench_tune.py --sweep-dir RUN_DIR --name NAME --sweep-command "..."

``--sweep-dir`` reads a sweep a user ran (``elmm-ray tune CONFIG --space SPACE
run_dir=RUN_DIR``, e.g. the demo compression sweep, ASHA included; ``--sweep-command``
records that command) and saves each trial's time against its training time
(``bench/results/tune_NAME.json``): a trial's time is Tune's ``time_total_s`` at its last
report (ASHA-stopped trials included), its training time the ``train_seconds`` of its last
validation record.

``--backend local`` is what a sweep of one-CPU-worker trials does by default
(``tune.trial_backend=auto``); ``ray`` fits a TorchTrainer per trial (the figures before it).

Every trial of the sweep runs to the end (no scheduler), so both sides do the same work.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, save  # noqa: E402

from elmm_ray.config import RayConfig, load_config  # noqa: E402
from elmm_ray.layout import absolute_paths  # noqa: E402
from elmm_ray.pipeline import pipeline_stages  # noqa: E402
from elmm_ray.ray_session import init_ray  # noqa: E402
from elmm_ray.stages import run_stages  # noqa: E402
from elmm_ray.tables import format_table  # noqa: E402
from elmm_ray.tune.space import load_space  # noqa: E402
from elmm_ray.tune.sweep import run_sweep  # noqa: E402
from elmm_ray.tune.trial import trial_config  # noqa: E402

DEMO = str(REPO_ROOT / "configs" / "demo.yaml")
TINY = [
    "model.preset=tiny-test", "dataset.synth.num_entities=120", "dataset.synth.max_images=2",
    "dataset.synth.image_size=32", "images.max_images_per_entity=2", "mvtc.heads=2",
    "train.epochs=3", "train.global_batch_size=16", "train.num_negatives=8",
    "train.val_max_queries=40", "eval.batch_size=64", "tune.latency_repeats=3",
]
N_VISUAL = [2, 4, 8, 16, 32, 64]


def summarise_sweep(run_dir: Path, name: str, sweep_command: str) -> None:
    """The overhead of every trial of a finished sweep in ``run_dir`` (see the docstring)."""
    tune_dir = run_dir / "tune"
    if not (tune_dir / "results.csv").is_file():
        raise SystemExit(f"{tune_dir / 'results.csv'} not found: run the sweep first "
                         "(elmm-ray tune CONFIG --space SPACE run_dir=RUN_DIR)")
    last_report = {}
    for path in (tune_dir / "experiment").glob("*/result.json"):
        lines = path.read_text().splitlines()
        if lines:
            record = json.loads(lines[-1])
            last_report[record["trial_id"]] = record
    trials = []
    with open(tune_dir / "results.csv", newline="") as f:
        for row in csv.DictReader(f):
            tid = row["trial_id"]
            history = (tune_dir / "trials" / tid / "train" / "metrics.jsonl").read_text()
            train_seconds = json.loads(history.splitlines()[-1])["train_seconds"]
            trial_seconds = last_report[tid]["time_total_s"]
            params = {k: row[k] for k in row if "." in k}
            trials.append({"trial_id": tid, "status": row["status"], **params,
                           "reports": int(row["training_iteration"]),
                           "val_mrr": float(row["val_mrr"]), "trial_seconds": trial_seconds,
                           "train_seconds": train_seconds,
                           "overhead_seconds": trial_seconds - train_seconds,
                           "overhead_share": 1 - train_seconds / trial_seconds})
    train_total = sum(t["train_seconds"] for t in trials)
    trial_total = sum(t["trial_seconds"] for t in trials)
    payload = {"command": shlex.join(["python", "bench/bench_tune.py", *sys.argv[1:]]),
               "sweep_command": sweep_command,
               "trials": trials, "overhead_share": 1 - train_total / trial_total,
               "most_overhead_share": max(t["overhead_share"] for t in trials)}
    rows = [(t["trial_id"], t["status"], t["reports"], f"{t['trial_seconds']:.1f}",
             f"{t['train_seconds']:.1f}", f"{100 * t['overhead_share']:.0f}%")
            for t in trials]
    print(format_table(rows, ["trial", "status", "reports", "trial s", "train s", "overhead"],
                       title=f"{run_dir}: overhead {100 * payload['overhead_share']:.0f}% "
                             "of the trials' time"))
    save(f"tune_{name}", payload)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", choices=["ray", "local"], default="ray")
    parser.add_argument("--trials", type=int, default=4, help="trials (<= 6)")
    parser.add_argument("--sweep-dir", type=Path, help="summarise this finished sweep instead")
    parser.add_argument("--name", default="sweep", help="results name with --sweep-dir")
    parser.add_argument("--sweep-command", default="", help="with --sweep-dir: the command "
                        "that ran the sweep, recorded with the figures")
    parser.add_argument("overrides", nargs="*", help="key=value for every run")
    args = parser.parse_args()
    if args.sweep_dir:
        summarise_sweep(args.sweep_dir, args.name, args.sweep_command)
        return
    values = N_VISUAL[:args.trials]
    init_ray(RayConfig(num_cpus=2))
    # --backend sets where trials train (tune.trial_backend; its default, auto, trains these
    # one-worker trials locally) and train.backend of the independent runs.
    overrides = [*TINY, f"train.backend={args.backend}", f"tune.trial_backend={args.backend}",
                 "train.num_workers=1",
                 "tune.scheduler=none", "tune.search=grid", "tune.num_samples=1",
                 *args.overrides]
    with tempfile.TemporaryDirectory(prefix="bench_tune_") as tmp:
        root = Path(tmp)
        space_file = root / "space.yaml"
        space_file.write_text(json.dumps(
            {"params": {"mvtc.n_visual": {"type": "choice", "values": values}}}))
        cfg = absolute_paths(load_config(DEMO, [f"run_dir={root / 'sweep'}", *overrides]))
        space = load_space(space_file, cfg)
        start = time.perf_counter()
        result = run_sweep(cfg, space, show_progress=False)
        sweep_seconds = time.perf_counter() - start
        trials = []
        for row in result.rows:
            history = (result.out_dir / "trials" / row["trial_id"] / "train" /
                       "metrics.jsonl").read_text().splitlines()
            train_seconds = json.loads(history[-1])["train_seconds"]
            trials.append({"n_visual": row["mvtc.n_visual"], "val_mrr": row["val_mrr"],
                           "trial_seconds": row["trial_seconds"],
                           "train_seconds": train_seconds,
                           "overhead_seconds": row["trial_seconds"] - train_seconds})
        # The same trials as independent runs of the whole pipeline, each in its own run dir.
        start = time.perf_counter()
        independent = []
        for i, value in enumerate(values):
            run_cfg = trial_config(cfg, {"mvtc.n_visual": value}, root / f"run{i}")
            t0 = time.perf_counter()
            run_stages(pipeline_stages(run_cfg), run_cfg, show_progress=False)
            independent.append(time.perf_counter() - t0)
        independent_seconds = time.perf_counter() - start
    train_total = sum(t["train_seconds"] for t in trials)
    trial_total = sum(t["trial_seconds"] for t in trials)
    # Where the sweep's wall time went: the shared stages, Tuner.fit (the trials plus Tune's
    # own start, trial processes and bookkeeping: `tune_outside_trials`), the outputs.
    parts = dict(result.seconds, tune_outside_trials=result.seconds["tuner_fit"] - trial_total)
    payload = {
        "command": "python bench/bench_tune.py " + " ".join(sys.argv[1:]),
        "backend": args.backend, "trials": trials, "shared_stages": result.shared_stages,
        "trial_stages": result.trial_stages, "sweep_seconds": sweep_seconds,
        "trials_per_hour": 3600 * len(trials) / sweep_seconds,
        "overhead_share": 1 - train_total / trial_total,
        "sweep_parts_seconds": parts,
        # Tuner.fit against the training in it: the overhead per trial with Tune's own part.
        "overhead_share_with_tune": 1 - train_total / result.seconds["tuner_fit"],
        "independent_seconds": independent_seconds, "independent_runs": independent,
        "sharing_speedup": independent_seconds / sweep_seconds,
    }
    rows = [(t["n_visual"], f"{t['trial_seconds']:.1f}", f"{t['train_seconds']:.1f}",
             f"{t['overhead_seconds']:.1f}", f"{t['val_mrr']:.3f}") for t in trials]
    print(format_table(rows, ["n_visual", "trial s", "train s", "overhead s", "val MRR"],
                       title=f"sweep of {len(trials)} trials ({args.backend} backend)"))
    summary = [("sweep wall time", f"{sweep_seconds:.1f} s"),
               ("  shared stages", f"{parts['shared_stages']:.1f} s"),
               ("  Tuner.fit", f"{parts['tuner_fit']:.1f} s"),
               ("    of which outside the trials", f"{parts['tune_outside_trials']:.1f} s"),
               ("  outputs (table, best configs, plot)", f"{parts['outputs']:.1f} s"),
               ("overhead share of Tuner.fit",
                f"{100 * payload['overhead_share_with_tune']:.0f}%"),
               ("trials per hour", f"{payload['trials_per_hour']:.0f}"),
               ("overhead share of trial time", f"{100 * payload['overhead_share']:.0f}%"),
               ("same trials as independent runs", f"{independent_seconds:.1f} s"),
               ("time saved by sharing upstream stages",
                f"{payload['sharing_speedup']:.2f}x")]
    print(format_table(summary, title="sweep vs independent runs"))
    save(f"tune_{args.backend}", payload)


if __name__ == "__main__":
    main()

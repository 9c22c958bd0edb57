"""The fault matrix of ``tests/test_faults.py`` and ``bench/bench_reliability.py``: each case
runs an ``elmm-ray`` command in a subprocess (its own local Ray) with ``ELMM_FAULT`` set
(:mod:`elmm_ray.faults`) or under a watchdog that SIGKILLs the command's process group, reruns
the same command until it completes, and compares the run directory with an uninterrupted run
of the same config: row counts (no duplicate, no missing row) and final figures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
TOLERANCE = 1e-6  # CPU runs with fixed threads are deterministic; a resume is exact

# The Ray config of the matrix: the tiny run on Ray (1 Train worker, 1 eval worker), several
# shards, parts and checkpoints so that the N-th occurrence of a point falls mid-stage; the
# entity table (the demo encodes entities instead), so that the entity_init stage is in it.
RAY_RUN = [
    "model.entity_repr=table",
    "dataset.synth.num_entities=60", "dataset.synth.max_images=2", "dataset.synth.image_size=32",
    "images.max_images_per_entity=2", "images.max_shard_bytes=40000", "ray.data_batch_size=16",
    "ray.data_part_rows=16",
    "model.preset=tiny-test", "mvtc.n_visual=4", "mvtc.n_text=4", "mvtc.heads=2",
    "train.backend=ray", "train.num_workers=1", "train.cpus_per_worker=1", "train.epochs=2",
    "train.global_batch_size=16", "train.learning_rate=0.003", "train.num_negatives=8",
    "train.eval_every=8", "eval.batch_size=64", "prune.method=magnitude", "prune.finetune_steps=6",
]
# Stages each stage's case starts after (copied from the uninterrupted run), and what it runs.
UPSTREAM = {
    "pack": [], "extract": ["synth", "pack"], "entity_init": ["synth", "pack", "extract"],
    "train": ["synth", "pack", "extract", "entity_init"],
    "eval": ["synth", "pack", "extract", "entity_init", "train"],
    "prune": ["synth", "pack", "extract", "entity_init", "train", "eval"],
    "export": ["synth", "pack", "extract", "entity_init", "train", "eval", "prune"],
}
# Paths (globs) each stage leaves; a stage's Ray Train runs only (a later stage's finished
# run copied in would make that stage resume from its last checkpoint and train nothing).
ARTIFACTS = {"synth": ["data"], "pack": ["shards"], "extract": ["features"],
             "entity_init": ["entity_init.safetensors", "tokenizer", "backbone"],
             "train": ["train", "ray_train/train-*"], "eval": ["eval"],
             "prune": ["prune", "ray_train/prune_*"], "export": ["export"]}


@dataclass
class Case:
    """One injected fault: ``command`` (``elmm-ray`` arguments before the config) run on a
    run directory seeded with the uninterrupted run's stages before ``stage``; the fault is
    ``fault`` (``POINT:N`` of :mod:`elmm_ray.faults`) or ``watchdog`` (a function of the run
    directory that says when to SIGKILL the command's process group: the driver and its
    Ray)."""

    name: str
    stage: str
    command: str
    fault: str = ""
    target: str = ""  # "worker" or "driver"
    watchdog: Callable[[Path], bool] | None = None
    extra: list[str] = field(default_factory=list)


def checkpoints_at_least(n: int, sub: str = "ray_train/train-*") -> Callable[[Path], bool]:
    return lambda run: len(list(run.glob(f"{sub}/checkpoint_*"))) >= n


def trial_finished(run: Path) -> bool:
    return any('"trial_complete": true' in p.read_text()
               for p in (run / "tune" / "experiment").glob("*/result.json"))


def env_for(fault: str, fault_dir: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2",
               TUNE_GLOBAL_CHECKPOINT_S="1", ELMM_FAULT_DIR=str(fault_dir),
               ELMM_PROGRESS_INTERVAL="15")
    env.pop("RAY_ADDRESS", None)
    env.pop("ELMM_FAULT", None)
    if fault:
        env["ELMM_FAULT"] = fault
    return env


# `elmm-ray` as a driver that only orchestrates: the guard of ELMM_ORCHESTRATOR_PID
# (elmm_ray/models/build.py) raises if this process builds the model (its Ray workers are
# other processes).
ORCHESTRATOR = ("import os, sys; os.environ['ELMM_ORCHESTRATOR_PID'] = str(os.getpid()); "
                "from elmm_ray.cli import main; sys.exit(main(sys.argv[1:], whole_process=True))")
COMMAND_HEADER = "$ elmm-ray "


def elmm(args: list[str], env: dict, log: Path, timeout: float,
         watchdog: Callable[[Path], bool] | None = None, run: Path | None = None, *,
         orchestrator: bool = False) -> int:
    """Run ``elmm-ray ARGS`` in its own process group, its output (not a terminal) appended
    to ``log`` after a ``$ elmm-ray ARGS`` line; with ``watchdog``, SIGKILL the group when it
    says so; with ``orchestrator``, the driver must not build the model. Whatever the command
    leaves behind (its local Ray) is killed after."""
    with open(log, "a") as out:
        out.write(f"\n{COMMAND_HEADER}{' '.join(args)}\n")
        out.flush()
        launcher = ["-c", ORCHESTRATOR] if orchestrator else ["-m", "elmm_ray.cli"]
        proc = subprocess.Popen([sys.executable, *launcher, *args], env=env,
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + timeout
        while proc.poll() is None:
            if watchdog is not None and run is not None and watchdog(run):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            if time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise TimeoutError(f"elmm-ray {' '.join(args)} ran over {timeout:.0f} s ({log})")
            time.sleep(0.2)
        rc = proc.wait()
    try:  # the local Ray a killed driver started (raylet, GCS, workers)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return rc


def seed_run(base: Path, run: Path, stages: list[str]) -> None:
    """``run`` with the manifests and outputs of ``stages`` copied from ``base``."""
    (run / "manifests").mkdir(parents=True, exist_ok=True)
    for stage in stages:
        shutil.copy2(base / "manifests" / f"{stage}.json", run / "manifests" / f"{stage}.json")
        for src in [p for pattern in ARTIFACTS[stage] for p in sorted(base.glob(pattern))]:
            dst = run / src.relative_to(base)
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True, symlinks=True)
            elif src.is_file():
                shutil.copy2(src, dst)


# --- what a run directory holds -------------------------------------------------------------


def _rows(keys: list) -> dict:
    return {"rows": len(keys), "unique": len(set(keys))}


def snapshot(run: Path) -> dict:
    """Row counts (``rows``: name -> {rows, unique}) and arrays / figures (``values``) of
    every stage output present in ``run``."""
    import pyarrow.parquet as pq
    from safetensors.numpy import load_file

    rows: dict[str, dict] = {}
    values: dict[str, np.ndarray] = {}
    shards = sorted((run / "shards").glob("shard-*.parquet"))
    if (run / "shards" / "manifest.json").is_file():
        keys = [k for f in shards for k in zip(
            *pq.read_table(f, columns=["entity", "image_index"]).to_pydict().values())]
        rows["pack rows"] = _rows(keys)
    if (run / "features" / "manifest.json").is_file():
        from elmm_ray.data.feature_store import FeatureStore

        store = FeatureStore.open(run / "features")
        index = store.index_table()
        rows["feature store rows"] = _rows(list(zip(index["entity"].to_pylist(),
                                                    index["image_index"].to_pylist())))
        num = int(max(index["entity"].to_pylist())) + 1
        feats, mask = store.features_for(np.arange(num))
        values["features"] = feats.float().numpy()
        values["feature mask"] = mask.float().numpy()
    if (run / "entity_init.safetensors").is_file():
        values["entity_init"] = load_file(run / "entity_init.safetensors")["entity_table"]
    for sub in ("train", "prune/finetune_1"):
        if (run / sub / "summary.json").is_file():
            summary = json.loads((run / sub / "summary.json").read_text())
            values[f"{sub} steps"] = np.array([summary["steps"]])
            rows[f"{sub} losses"] = _rows(list(range(len(summary["losses"]))))
            if summary["losses"] and summary["steps"] != len(summary["losses"]):
                rows[f"{sub} losses"]["unique"] = -1  # not one loss per step: reported
            records = run / sub / "metrics.jsonl"  # absent: every record lost
            steps = [json.loads(line)["step"] for line in
                     (records.read_text().splitlines() if records.is_file() else [])]
            rows[f"{sub} metrics.jsonl records"] = _rows(steps)
            values[f"{sub} val_mrr"] = np.array([h["val_mrr"] for h in summary["history"]])
        if (run / sub / "model" / "trainable.safetensors").is_file():
            for k, v in load_file(run / sub / "model" / "trainable.safetensors").items():
                values[f"{sub}/model:{k}"] = v
    if (run / "eval" / "metrics_test.json").is_file():
        m = json.loads((run / "eval" / "metrics_test.json").read_text())
        values.update({f"eval {k}": np.array([v]) for k, v in m["overall"].items()
                       if isinstance(v, (int, float))})
    if (run / "manifests" / "prune.json").is_file():
        p = json.loads((run / "manifests" / "prune.json").read_text())
        if p.get("status") == "complete":
            values.update({f"prune post-FT {k}": np.array([v])
                           for k, v in p["post_ft"].items() if isinstance(v, (int, float))})
    if (run / "export" / "elmm_export.json").is_file():
        for k, v in load_file(run / "export" / "elmm.safetensors").items():
            values[f"export:{k}"] = v
    results = run / "tune" / "results.csv"
    if results.is_file():
        import pandas as pd

        frame = pd.read_csv(results)
        rows["tune trials"] = _rows(frame["trial_id"].tolist())
        key = [c for c in frame.columns if c.startswith("train.")][0]
        for _, r in frame.sort_values(key).iterrows():
            values[f"tune {key}={r[key]} val_mrr"] = np.array([r["val_mrr"]])
    return {"rows": rows, "values": values}


def compare(case: dict, base: dict) -> dict:
    """Rows lost and duplicated (per row collection) and the largest absolute deviation of
    any value, against the uninterrupted run; values only in the baseline are skipped (a
    case runs the stages up to its command's)."""
    lost = dup = 0
    problems = []
    for name, got in case["rows"].items():
        want = base["rows"].get(name)
        if got["unique"] == -1:
            problems.append(f"{name}: not one row per step")
            lost += 1
            continue
        dup += got["rows"] - got["unique"]
        if want is not None and got["unique"] < want["unique"]:
            lost += want["unique"] - got["unique"]
            problems.append(f"{name}: {got['unique']} of {want['unique']}")
        if got["rows"] != got["unique"]:
            problems.append(f"{name}: {got['rows'] - got['unique']} duplicated")
    deviation = 0.0
    for name, value in case["values"].items():
        want = base["values"].get(name)
        if want is None or np.shape(want) != np.shape(value):
            problems.append(f"{name}: shape {np.shape(value)} vs {np.shape(want)}")
            deviation = float("inf")
            continue
        d = float(np.max(np.abs(np.asarray(value, np.float64) - np.asarray(want, np.float64)),
                         initial=0.0))
        if d > TOLERANCE:
            problems.append(f"{name}: deviates by {d:.3g}")
        deviation = max(deviation, d)
    return {"rows_lost": lost, "rows_duplicated": dup, "max_deviation": deviation,
            "problems": problems}


def run_case(case: Case, base_run: Path, base_snapshot: dict, work: Path, *,
             overrides: list[str], timeout: float = 600, max_reruns: int = 2) -> dict:
    """Run ``case`` in ``work/<name>``: the faulted command, then the same command again
    until it exits 0; the result row of the matrix."""
    run = work / case.name
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    if case.stage in UPSTREAM:
        seed_run(base_run, run, UPSTREAM[case.stage])
    log = work / f"{case.name}.log"
    log.unlink(missing_ok=True)
    fault_dir = work / f"{case.name}.faults"
    shutil.rmtree(fault_dir, ignore_errors=True)
    env = env_for(case.fault, fault_dir)
    args = [*case.command.split(), str(DEMO), *case.extra, f"run_dir={run}", *overrides]
    start = time.perf_counter()
    rcs = [elmm(args, env, log, timeout, case.watchdog, run)]
    fired = (list(fault_dir.glob("*.fired")) if case.fault else [rcs[0] == -signal.SIGKILL])
    while rcs[-1] != 0 and len(rcs) <= max_reruns:
        rcs.append(elmm(args, env, log, timeout))
    result = {"case": case.name, "stage": case.stage, "fault": case.fault or "watchdog",
              "target": case.target, "fired": bool(fired), "exit_codes": rcs,
              "finished": rcs[-1] == 0, "seconds": round(time.perf_counter() - start, 1)}
    result.update(compare(snapshot(run), base_snapshot) if result["finished"] else
                  {"rows_lost": None, "rows_duplicated": None, "max_deviation": None,
                   "problems": [f"did not finish: see {log}"]})
    result["survived"] = bool(result["fired"] and result["finished"]
                              and result["rows_lost"] == 0 and result["rows_duplicated"] == 0
                              and result["max_deviation"] <= TOLERANCE)
    return result


def baseline(work: Path, overrides: list[str], command: str = "run",
             timeout: float = 900, extra: list[str] = (), *,
             orchestrator: bool = False) -> tuple[Path, dict]:
    """The uninterrupted run of ``command`` and its snapshot (its console output:
    :func:`console_output` of ``baseline_log``)."""
    run = work / f"baseline-{command.split()[0]}"
    shutil.rmtree(run, ignore_errors=True)
    log = baseline_log(work, command)
    log.unlink(missing_ok=True)
    rc = elmm([*command.split(), str(DEMO), *extra, f"run_dir={run}", *overrides],
              env_for("", work / "baseline.faults"), log, timeout, orchestrator=orchestrator)
    if rc != 0:
        raise RuntimeError(f"the uninterrupted run failed (exit {rc}): see {log}")
    return run, snapshot(run)


def baseline_log(work: Path, command: str = "run") -> Path:
    return work / f"baseline-{command.split()[0]}.log"


def console_output(log: Path) -> str:
    """What the last command :func:`elmm` ran into ``log`` printed (stdout and stderr)."""
    text = log.read_text()
    return text[text.rindex(f"\n{COMMAND_HEADER}") + 1:].split("\n", 1)[1]


RAY_CASES = [
    Case("pack-worker", "pack", "pack", "pack.shard:2", "worker"),
    Case("pack-driver", "pack", "pack", "pack.manifest:1", "driver"),
    Case("extract-worker", "extract", "extract", "extract.write:2", "worker"),
    Case("extract-driver", "extract", "extract", "extract.part:3", "driver"),
    Case("entity-init-driver", "entity_init", "entity_init", "entity_init.save:1", "driver"),
    Case("train-worker-step", "train", "eval", "train.step:21", "worker"),
    Case("train-worker-checkpoint", "train", "eval", "train.checkpoint:3", "worker"),
    Case("train-driver", "train", "eval", "", "driver", watchdog=checkpoints_at_least(2)),
    Case("eval-worker", "eval", "eval", "eval.rank:1", "worker"),
    Case("eval-driver", "eval", "eval", "eval.metrics:1", "driver"),
    Case("prune-worker", "prune", "prune", "train.step:3", "worker"),
    Case("prune-driver", "prune", "prune", "prune.round:1", "driver"),
    Case("export-worker", "export", "export", "export.write:1", "worker"),
]
QUICK_CASES = ["pack-driver", "train-worker-checkpoint", "eval-driver", "export-worker"]

TUNE_SPACE = """search: grid
num_samples: 1
params:
  train.learning_rate: {type: choice, values: [0.003, 0.001, 0.0003]}
"""
TUNE_RUN = [*RAY_RUN, "train.backend=local", "prune.method=none"]
TUNE_CASES = [
    Case("tune-trial", "tune", "tune", "tune.trial:1", "worker"),
    Case("tune-driver", "tune", "tune", "", "driver", watchdog=trial_finished),
]

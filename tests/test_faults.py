"""Fault injection (``elmm_ray/faults.py``) and the fault matrix (``tests/faultmatrix.py``).

Quick: the hook itself (parsing, one SIGKILL at the N-th occurrence, once per fault
directory), the resume repairs it found, and one SIGKILLed command (local training, no Ray)
rerun to the uninterrupted run's figures. Slow: the Ray matrix (``bench/bench_reliability.py``
runs all of it and writes the table)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from elmm_ray.faults import POINTS, parse
from elmm_ray.tracking import drop_records_after
from tests import faultmatrix as fm

HOOK = """
from elmm_ray.faults import fault_point
for i in range(5):
    print(i, flush=True)
    fault_point("train.step")
"""


def _hook(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HOOK], env=env, cwd=fm.REPO,
                          capture_output=True, text=True, timeout=60)


def test_parse_names_the_variable_and_the_points():
    assert parse("train.step:3, eval.rank:1") == {"train.step": 3, "eval.rank": 1}
    with pytest.raises(ValueError, match=r"ELMM_FAULT=.*unknown fault point 'train.stp'.*"
                                         r"train.step"):
        parse("train.stp:3")
    with pytest.raises(ValueError, match="needs a count N >= 1"):
        parse("train.step:0")
    assert all(text for text in POINTS.values())


def test_the_hook_kills_at_the_nth_occurrence_once_per_fault_dir(tmp_path):
    env = fm.env_for("train.step:3", tmp_path / "faults")
    first = _hook(env)
    assert first.returncode == -signal.SIGKILL
    assert first.stdout.split() == ["0", "1", "2"]  # died at the third occurrence
    assert (tmp_path / "faults" / "train.step.fired").is_file()
    again = _hook(env)  # the same command, the same environment: the fault has fired
    assert again.returncode == 0 and again.stdout.split() == ["0", "1", "2", "3", "4"]
    assert _hook(fm.env_for("", tmp_path / "none")).returncode == 0  # off when unset


def test_resumed_metrics_records_drop_what_a_killed_attempt_logged(tmp_path):
    lines = [json.dumps({"step": s, "val_mrr": 0.1}) for s in (8, 16, 24)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert drop_records_after(tmp_path, 16) == 1
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [8, 16]
    assert drop_records_after(tmp_path / "absent", 0) == 0


def test_compare_counts_lost_and_duplicated_rows():
    base = {"rows": {"pack rows": {"rows": 4, "unique": 4}}, "values": {"m": np.array([0.5])}}
    case = {"rows": {"pack rows": {"rows": 4, "unique": 3}}, "values": {"m": np.array([0.5])}}
    got = fm.compare(case, base)
    assert got["rows_lost"] == 1 and got["rows_duplicated"] == 1
    off = fm.compare({"rows": {}, "values": {"m": np.array([0.6])}}, base)
    assert off["max_deviation"] == pytest.approx(0.1) and off["problems"]


LOCAL = ["dataset.name=db15k-tiny", f"dataset.path={fm.REPO / 'tests/data/mygo_db15k_tiny'}",
         "model.preset=tiny-test", "mvtc.n_visual=4", "mvtc.n_text=4", "mvtc.heads=2",
         "train.backend=local", "train.global_batch_size=16", "train.learning_rate=0.003",
         "train.num_negatives=8", "eval.batch_size=64", "train.epochs=1",
         "images.max_images_per_entity=1"]


@pytest.mark.timeout(240)
def test_a_killed_local_training_reruns_to_the_same_figures(tmp_path):
    """The ``elmm-ray eval`` driver (local training: no Ray, no checkpoint) is SIGKILLed at
    its 3rd step; the same command then trains from the start and evaluates: one loss per
    step, one metrics record per round, the weights and metrics of an uninterrupted run."""
    from elmm_ray.data.kg import load_kg

    entities = load_kg(fm.REPO / "tests/data/mygo_db15k_tiny").num_entities
    emb = tmp_path / "visual.npy"
    np.save(emb, np.random.default_rng(0).standard_normal((entities, 24)).astype(np.float32))
    overrides = [*LOCAL, f"dataset.visual_embeddings.path={emb}"]
    base_run, base = fm.baseline(tmp_path, overrides, "eval")
    assert base["values"]["eval mrr"].size == 1
    case = fm.Case("local-train-driver", "local", "eval", "train.step:3", "driver")
    row = fm.run_case(case, base_run, base, tmp_path, overrides=overrides, timeout=240)
    assert row["exit_codes"] == [-signal.SIGKILL, 0], row
    assert row["survived"], row["problems"]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("names", [fm.QUICK_CASES])
def test_ray_fault_matrix(tmp_path, names, ray_pipeline_run):
    """SIGKILLed workers and drivers of the Ray pipeline (pack driver, a Train worker mid
    checkpoint, the eval driver, the export worker): the same command completes with no row
    lost or duplicated and the uninterrupted run's figures (``bench_reliability.py`` runs
    every case)."""
    base_run, base = ray_pipeline_run.run_dir, ray_pipeline_run.snapshot
    for case in [c for c in fm.RAY_CASES if c.name in names]:
        row = fm.run_case(case, base_run, base, tmp_path, overrides=fm.RAY_RUN)
        assert row["survived"], row

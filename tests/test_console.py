"""The console: short and clean through a pipe, full logs in the run directory, progress
from Ray Train's rank 0 reaching the driver."""

from __future__ import annotations

import io
import re

import pytest

from elmm_ray import console

# What a user must never see again on the console (issue 14's list).
NOISE = ("State API", "PlacementGroupCleaner", "core_worker.cc", "constructor arguments",
         "Token authentication", "Checkpoint successfully created", "Reporting training result",
         "logging_progress", "Running Dataset", "Loading weights", "Writing model shards",
         "Setting accelerator", "RayTrainWorker", "TrainController")


@pytest.fixture
def console_state(monkeypatch):
    """Restore what console.setup changes: the root logger's handlers and level, the
    environment variables it sets, the library loggers' handlers."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY",
                 "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        monkeypatch.delenv(name, raising=False)  # its old state comes back afterwards
    yield
    console.detach_log_file()
    root.handlers[:] = handlers
    root.setLevel(level)
    console._state["verbose"] = False


def test_stage_progress_prints_lines_when_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(console, "LINE_INTERVAL_S", 0.0)
    monkeypatch.setattr(console.sys, "stderr", io.StringIO())  # not a terminal, even with -s
    progress = console.StageProgress("extract", 10, "images")
    progress.update(n=4, failed=0)
    progress.update(n=6, failed=1)  # the last one: the stage runner says how it ended
    progress.close()
    silent = console.StageProgress("extract", 10, "images", enabled=False)
    silent.update(n=10)
    silent.close("done")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("[extract] 4/10 images (40%), ETA ")
    assert lines[0].endswith("failed 0")


def test_noise_is_kept_off_the_console_and_in_the_log_file(tmp_path, capsys, console_state):
    import logging

    console.setup(verbose=False)
    path = console.attach_log_file(tmp_path)
    try:
        logging.getLogger("ray").warning("Token authentication is enabled for this Ray "
                                         "cluster. Set RAY_AUTH_MODE=disabled to opt out.")
        logging.getLogger("elmm_ray.x").warning("a warning that matters")
        logging.getLogger("elmm_ray.x").info("detail for the log file")
    finally:
        console.detach_log_file()
    err = capsys.readouterr().err
    assert "warning: a warning that matters" in err
    assert "Token authentication" not in err and "detail for the log file" not in err
    text = path.read_text()
    assert "a warning that matters" in text and "detail for the log file" in text


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_driver_receives_rank0_progress_through_the_queue(ray_session):
    import ray

    from elmm_ray.train.loop import QueueProgress
    from elmm_ray.train.trainer import driver_progress

    @ray.remote(num_cpus=0)
    def rank0(queue) -> None:
        show = QueueProgress(queue, interval_s=3600.0)
        for step in range(1, 6):  # throttled: only the first, validation and last pass
            show({"step": step, "steps": 5, "epoch": 0, "loss": 1.0 / step})
        show({"step": 5, "steps": 5, "epoch": 0, "val_mrr": 0.5})

    records: list[dict] = []
    with driver_progress("train", progress=records.append) as queue:
        ray.get(rank0.remote(queue))
    assert [r["step"] for r in records] == [1, 5, 5]
    assert records[-1]["val_mrr"] == 0.5


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_run_through_a_pipe_is_short_and_clean(ray_pipeline_run):
    """`elmm-ray run` of the tiny config on Ray (Ray Data stages, Ray Train, pruning on
    workers; the fault matrix's uninterrupted run, conftest.ray_pipeline_run), its output not
    a terminal: no library noise, no duplicated line, at most ~60 lines; the logs are in the
    run directory. The driver only orchestrates: it never builds the model (the guard of
    ELMM_ORCHESTRATOR_PID raises if it does; its Ray workers are other processes)."""
    out, logs = ray_pipeline_run.console, ray_pipeline_run.run_dir / "logs"
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) <= 60, out
    noisy = [line for line in lines if any(n in line for n in NOISE)]
    assert not noisy, noisy
    assert len(set(lines)) == len(lines), [x for x in lines if lines.count(x) > 1]
    for stage in ("pack", "extract", "entity_init", "train", "eval", "prune", "export"):
        assert any(line.startswith(f"[{stage}] done in") for line in lines), (stage, out)
    assert "results (test, filtered, both directions)" in out
    assert f"logs: {logs}" in out
    assert "[train] done in" in (logs / console.LOG_FILE).read_text()
    worker_logs = list((logs / "ray").glob("worker-*.out"))
    assert worker_logs, "the workers' output was not kept in the run directory"


def test_every_command_help_names_keys_of_the_schema(capsys):
    from elmm_ray.cli import build_parser
    from elmm_ray.config.keys import COMMAND_KEYS, key_info

    unknown = [(c, k) for c, keys in COMMAND_KEYS.items() for k in keys if key_info(k) is None]
    assert not unknown, f"help names keys the schema does not have: {unknown}"
    parser = build_parser()
    for command, keys in COMMAND_KEYS.items():
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = capsys.readouterr().out
        assert "elmm-ray config keys" in text, command
        assert all(k in text for k in keys), command


def test_run_results_give_hits_at_1_per_direction(tmp_path, capsys, monkeypatch):
    """`elmm-ray run` prints tail and head Hits@1 when the evaluation has them (not after
    pruning, whose figures are of both directions together)."""
    from elmm_ray import cli, pipeline

    def figures(h1: float) -> dict:
        return {"mrr": 0.5, "mr": 3.0, "hits@1": h1, "hits@3": 0.6, "hits@10": 0.9}

    result = {"dataset": "synthetic", "parameters": 10, "export_dir": str(tmp_path / "export"),
              "skipped_training": False, "timings": {"train": 1.0}, "train_seconds": 1.0,
              "metrics": {"overall": figures(h1=0.25), "tail": figures(h1=0.3),
                          "head": figures(h1=0.2)}}
    monkeypatch.setattr(pipeline, "run_all", lambda cfg: result)
    assert cli.main(["run", "configs/demo.yaml", f"run_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"Hits@1 tail / head +0\.3000 / 0\.2000\n", out), out
    assert "by relation" not in out  # no metrics file: no table
    result["metrics"] = {"overall": figures(h1=0.25), "unpruned": figures(h1=0.3)}
    assert cli.main(["run", "configs/demo.yaml", f"run_dir={tmp_path}"]) == 0
    assert "tail / head" not in capsys.readouterr().out


def test_run_results_give_hits_at_1_per_relation(tmp_path, capsys, monkeypatch):
    """`elmm-ray run` prints Hits@1 of each relation and direction from the eval stage's
    metrics file for a KG of up to 12 relations, names the file for more, and prints
    neither after pruning (the results are the pruned model's, the file the unpruned)."""
    import json

    from elmm_ray import cli, pipeline

    def relation(i: int) -> dict:
        entry = {"relation": f"has colour {i}", "id": i,
                 "head": {"count": 35, "hits@1": 0.2 + i / 100, "mrr": 0.4}}
        if i % 2 == 0:
            entry["tail"] = {"count": 36, "hits@1": None, "mrr": None}  # NaN in the file
        return entry

    metrics_file = tmp_path / "eval" / "metrics_test.json"
    metrics_file.parent.mkdir()
    figures = {"mrr": 0.5, "mr": 3.0, "hits@1": 0.25, "hits@3": 0.6, "hits@10": 0.9}
    result = {"dataset": "synthetic", "parameters": 10, "export_dir": str(tmp_path / "export"),
              "skipped_training": False, "timings": {"train": 1.0}, "train_seconds": 1.0,
              "metrics": {"overall": figures}}
    monkeypatch.setattr(pipeline, "run_all", lambda cfg: result)
    for count, pruned in ((3, False), (13, False), (3, True)):
        metrics_file.write_text(json.dumps({"relations": [relation(i) for i in range(count)]}))
        result["pruned"] = pruned
        assert cli.main(["run", "configs/demo.yaml", f"run_dir={tmp_path}"]) == 0
        out = capsys.readouterr().out
        if pruned:
            assert "by relation" not in out and "relations:" not in out
        elif count == 3:
            assert "Hits@1 by relation (test)" in out
            assert re.search(r"has colour 1 +- +0\.21 \(35\)\n", out), out
            assert re.search(r"has colour 2 +- +0\.22 \(35\)\n", out), out  # NaN: -
        else:
            assert f"Hits@1 of each of the 13 relations: {metrics_file}" in out

"""Experiment tracking (`train.loggers`, `tracking.*`): MLflow against a local SQLite store
(MLflow >= 3.7 refuses file stores unless told otherwise) and W&B in offline mode, on the
tiny local run; a run resumed through the loop's resume path (the one Ray Train uses)
continues the same tracking run with increasing steps."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import struct
import time
from pathlib import Path

import pytest

from elmm_ray.config import ConfigError, load_config
from elmm_ray.data.dataset import load_dataset
from elmm_ray.data.shards import pack_images
from elmm_ray.layout import RunLayout, absolute_paths, read_json
from elmm_ray.stages import run_stage
from elmm_ray.stages.prune import finetune_config
from elmm_ray.tracking import TRACKING_FILE, flatten, metric_name, numbers, tracked_config
from elmm_ray.train.loop import (
    LocalSession,
    LoopSpec,
    TorchEngine,
    optimizer_steps_per_epoch,
    prepare_context,
    run_loop,
    total_steps,
    train_local,
)
from tests.tiny import TINY as TINY_BASE

pytestmark = pytest.mark.timeout(300)

TINY = [*TINY_BASE, "train.max_steps=4", "train.eval_every=2", "train.val_max_queries=20"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The tiny synthetic KG and its shards, made once (no Ray)."""
    root = tmp_path_factory.mktemp("tracking_data")
    cfg = load_config("configs/demo.yaml", [f"run_dir={root}", *TINY])
    run_stage("synth", cfg, show_progress=False)
    pack_images(load_dataset(cfg), root / "shards", use_ray=False, show_progress=False)
    return root


def _config(data_dir: Path, run_dir: Path, *overrides: str):
    return absolute_paths(load_config("configs/demo.yaml", [
        f"run_dir={run_dir}", *TINY, "dataset.name=synth", f"dataset.path={data_dir / 'data'}",
        f"images.shard_dir={data_dir / 'shards'}", *overrides]))


# --- config and helpers (fast) ------------------------------------------------------------------


def test_a_missing_tracking_package_fails_at_load_with_the_install_hint(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'elmm-ray\[wandb\]'"):
        load_config("configs/demo.yaml", ["train.loggers=[jsonl,wandb]"])
    assert load_config("configs/demo.yaml", ["train.loggers=[jsonl]"]).train.loggers == ["jsonl"]
    with pytest.raises(ConfigError, match="names a logger twice"):
        load_config("configs/demo.yaml", ["train.loggers=[jsonl,jsonl]"])


@pytest.mark.parametrize("uri", ["sqlite:///mlflow.db", "mlruns", "file://mlruns"])
def test_a_relative_local_mlflow_store_is_refused(uri):
    with pytest.raises(ConfigError, match=r"tracking.mlflow_uri.*absolute"):
        load_config("configs/demo.yaml", [f"tracking.mlflow_uri={uri}"])


def test_params_are_the_config_without_tracking_keys():
    cfg = load_config("configs/demo.yaml", ["tracking.mlflow_uri=http://user:secret@host:5000"])
    params = flatten(tracked_config(cfg))
    assert params["train.learning_rate"] == 0.001 and params["model.preset"] == "tiny-pretrained"
    assert not any(k.startswith("tracking.") for k in params)
    assert "train.loggers" not in params and "secret" not in json.dumps(params)
    assert numbers({"overall": {"hits@1": 0.5, "mrr": 1}, "split": "test", "ok": True},
                   "eval/test") == {"eval/test/overall/hits_at_1": 0.5,
                                    "eval/test/overall/mrr": 1.0}
    assert metric_name("a b/c@3") == "a b/c_at_3"


# --- MLflow -------------------------------------------------------------------------------------


class Killed(Exception):
    """The process dies right after the first checkpoint (validation report)."""


class KilledAfterFirstReport(LocalSession):
    def __init__(self) -> None:
        super().__init__()
        self.state: dict | None = None

    def report(self, record: dict, state: dict) -> None:
        self.state = state
        raise Killed


def _loop(cfg, kg, session):
    ctx = prepare_context(cfg, kg, LoopSpec())
    queries = kg.queries("train", cfg.train.both_directions)
    steps = total_steps(cfg, optimizer_steps_per_epoch(cfg, queries))
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    out = RunLayout.of(cfg).path("train")
    return run_loop(cfg, kg, ctx, queries, TorchEngine(params, cfg, steps), session, out)


def test_mlflow_run_has_params_step_metrics_artifacts_and_resume_continues_it(
        data_dir, tmp_path):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from mlflow import MlflowClient

    from elmm_ray.stages.base import StageContext
    from elmm_ray.stages.train import run_eval

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    cfg = _config(data_dir, tmp_path / "run", "train.loggers=[jsonl,tensorboard,mlflow]",
                  f"tracking.mlflow_uri={uri}", "tracking.experiment=tracking-test")
    kg = load_dataset(cfg)
    layout = RunLayout.of(cfg)

    # Killed after the checkpoint at step 2, then resumed from it (as Ray Train does).
    first = KilledAfterFirstReport()
    with pytest.raises(Killed):
        _loop(cfg, kg, first)
    run_id = read_json(layout.path(TRACKING_FILE))["mlflow"]["run_id"]
    resumed = LocalSession()
    resumed.resumed_state = first.state
    summary = _loop(cfg, kg, resumed)
    assert summary["steps"] == 4
    assert read_json(layout.path(TRACKING_FILE))["mlflow"]["run_id"] == run_id

    run_stage_eval = run_eval(StageContext(cfg, show_progress=False, _kg=kg))
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tracking-test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # one run: the resume reopened it
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == layout.root.name
    params = run.data.params
    assert params["train.learning_rate"] == "0.003" and params["train.max_steps"] == "4"
    assert params["model.preset"] == "tiny-test"
    assert not any(k.startswith("tracking.") for k in params)
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [2, 4]
    val_mrr = [(m.step, m.value) for m in client.get_metric_history(run_id, "train/val_mrr")]
    assert val_mrr == [(h["step"], pytest.approx(h["val_mrr"])) for h in summary["history"]]
    overall = run_stage_eval["overall"]
    assert run.data.metrics["eval/test/overall/mrr"] == pytest.approx(overall["mrr"])
    assert run.data.metrics["eval/test/overall/hits_at_1"] == pytest.approx(overall["hits@1"])
    artifacts = {a.path for folder in ("train", "eval")
                 for a in client.list_artifacts(run_id, folder)}
    eval_file = Path(run_stage_eval["metrics_file"]).name
    assert {"train/training_curve.png", f"eval/{eval_file}"} <= artifacts
    # Artifacts live next to the SQLite store, not in the working directory.
    assert (tmp_path / "store" / "mlartifacts").is_dir()
    # jsonl and tensorboard as before: the resumed run appended to metrics.jsonl.
    lines = layout.path("train", "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [2, 4]
    assert layout.path("train", "tensorboard").is_dir()

    # A loop with derived settings (pruning's fine-tuning) logs into the run of the
    # command's config (<run_dir>/config.yaml), under its own prefix.
    layout.write_config(cfg)
    train_local(finetune_config(dataclasses.replace(cfg, prune=dataclasses.replace(
        cfg.prune, finetune_steps=2))), kg, LoopSpec(out_subdir="prune/finetune_1"),
        show_progress=False)
    assert read_json(layout.path(TRACKING_FILE))["mlflow"]["run_id"] == run_id
    assert [m.step for m in client.get_metric_history(run_id, "prune/finetune_1/loss")] == [2]
    assert "prune/finetune_1/training_curve.png" in {
        a.path for a in client.list_artifacts(run_id, "prune/finetune_1")}

    # Another config in the same run directory (a command writes it first) opens a new run.
    other = _config(data_dir, tmp_path / "run", "train.loggers=[mlflow]",
                    f"tracking.mlflow_uri={uri}", "tracking.experiment=tracking-test",
                    "train.max_steps=2")
    layout.write_config(other)
    train_local(other, kg, show_progress=False)
    new_id = read_json(layout.path(TRACKING_FILE))["mlflow"]["run_id"]
    assert new_id != run_id
    assert [m.step for m in client.get_metric_history(new_id, "train/loss")] == [2]
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [2, 4]


# --- W&B ----------------------------------------------------------------------------------------


def wandb_records(path: Path):
    """The records of a W&B transaction log (``run-<id>.wandb``: a 7-byte header, then
    LevelDB-log framed protobuf records in 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, buffer = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        buffer += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buffer)
            yield record
            buffer = b""


def test_wandb_offline_run_holds_config_step_metrics_and_the_curve(data_dir, tmp_path,
                                                                   monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_env"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _config(data_dir, tmp_path / "run", "train.loggers=[wandb]",
                  "tracking.wandb_mode=offline", f"tracking.wandb_dir={tmp_path / 'wb'}")
    kg = load_dataset(cfg)
    summary = train_local(cfg, kg, show_progress=False)
    layout = RunLayout.of(cfg)
    assert not layout.path("train", "metrics.jsonl").exists()  # jsonl was not asked for
    assert not layout.path("train", "tensorboard").exists()
    assert (layout.path("train", "summary.json")).is_file()  # the stage's own record
    run_id = read_json(layout.path(TRACKING_FILE))["wandb"]["run_id"]
    (run_dir,) = (tmp_path / "wb" / "wandb").glob(f"offline-run-*-{run_id}")
    assert (run_dir / "files" / "train" / "training_curve.png").is_file()
    # W&B's service process may still be flushing the transaction log after `finish()`
    # returned: read it once it holds the exit record (seen: a read too early lacked the
    # run record, one run in a few under load).
    log_file, deadline = run_dir / f"run-{run_id}.wandb", time.monotonic() + 60
    records = list(wandb_records(log_file))
    while (not any(r.WhichOneof("record_type") == "exit" for r in records)
           and time.monotonic() < deadline):
        time.sleep(0.5)
        records = list(wandb_records(log_file))
    config, history, files = {}, [], set()
    for record in records:
        kind = record.WhichOneof("record_type")
        # The config is in the run record, or in later config records: read both.
        if kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({i.key: json.loads(i.value_json) for i in updates})
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in record.history.item})
        elif kind == "files":
            files |= {f.path for f in record.files.files}
    assert config["train"]["learning_rate"] == 0.003 and config["train"]["max_steps"] == 4
    assert "tracking" not in config
    assert [h["train/step"] for h in history] == [2, 4]
    assert [h["train/val_mrr"] for h in history] == pytest.approx(
        [h["val_mrr"] for h in summary["history"]])
    assert "train/training_curve.png" in files

"""Experiment tracking: one :class:`Tracker` over the loggers of ``train.loggers``.

- ``jsonl`` and ``tensorboard`` belong to one training run: ``<train dir>/metrics.jsonl`` and
  ``<train dir>/tensorboard`` (only a tracker opened with a training directory has them);
- ``mlflow`` and ``wandb`` hold one *tracking run* per run directory and config: the
  resolved config as parameters, per-step training metrics (``train/loss`` at its step;
  fine-tuning after pruning under ``prune/finetune_<k>/``), evaluation results and the
  artifacts (training curve, evaluation metrics, prune report, export record, Pareto plot).

Every process that logs (rank 0 of the training workers, the driver for eval, prune,
export and tune) opens the tracking run named in ``<run_dir>/tracking.json``; the first
opens it and writes the file. A resumed or rerun command with the same config (apart from
tracking keys, ``train.loggers`` and the fault hook) therefore continues the same MLflow /
W&B run; another config in the same run directory starts a new one. Environment variables
and tokens are never logged, nor the ``tracking`` section (a URI may hold credentials).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from elmm_ray.config import Config, config_hash, config_to_dict, load_config
from elmm_ray.layout import RunLayout, read_json, write_json_atomic

log = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"
REMOTE = ("mlflow", "wandb")
# Keys that do not make another experiment (a rerun with them changed continues the run).
UNTRACKED = ("tracking", "train.loggers", "train.fail_at_step")
MLFLOW_BATCH = 100  # MLflow takes at most 100 parameters (1000 metrics) per request


def flatten(data: dict, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}{sep}", sep))
        else:
            out[name] = value
    return out


def tracked_config(cfg: Config) -> dict:
    """The resolved config as nested plain data, without the ``UNTRACKED`` keys."""
    data = config_to_dict(cfg)
    for key in UNTRACKED:
        *sections, leaf = key.split(".")
        node = data
        for section in sections:
            node = node[section]
        node.pop(leaf, None)
    return data


def metric_name(name: str) -> str:
    """A name MLflow and W&B both accept: ``hits@1`` -> ``hits_at_1``."""
    return re.sub(r"[^\w\-. :/]", "_", name.replace("@", "_at_"))


def numbers(record: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of ``record`` (nested dicts flattened, bools and None dropped),
    as metric names under ``prefix``."""
    out = {}
    for key, value in flatten(record, sep="/").items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[metric_name(f"{prefix}/{key}" if prefix else key)] = float(value)
    return out


def mlflow_uri(cfg: Config) -> str:
    """``tracking.mlflow_uri``, by default a SQLite store in the run directory."""
    return cfg.tracking.mlflow_uri or f"sqlite:///{RunLayout.of(cfg).path('mlflow.db')}"


def wandb_dir(cfg: Config) -> Path:
    return Path(cfg.tracking.wandb_dir or RunLayout.of(cfg).root).expanduser().resolve()


def pin_tracking(cfg: Config) -> Config:
    """``cfg`` with the default tracking locations made explicit (a sweep's trials, each in
    its own run directory, log into the sweep's store)."""
    import dataclasses

    if not any(name in cfg.train.loggers for name in REMOTE):
        return cfg
    return dataclasses.replace(cfg, tracking=dataclasses.replace(
        cfg.tracking, mlflow_uri=mlflow_uri(cfg), wandb_dir=str(wandb_dir(cfg))))


# --- backends -----------------------------------------------------------------------------------


class JsonlBackend:
    """``<out>/metrics.jsonl``: every training record as one JSON line."""

    def __init__(self, out: Path, resume: bool) -> None:
        self.path = out / "metrics.jsonl"
        if not resume:
            self.path.unlink(missing_ok=True)

    def log_record(self, record: dict, prefix: str) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


def drop_records_after(out: Path, step: int) -> int:
    """Remove the records of ``<out>/metrics.jsonl`` past ``step``: a resumed run redoes the
    steps after its checkpoint, so records that a killed attempt logged for them (a
    validation round logged, its checkpoint never reported) would be there twice. Returns
    how many were removed. (TensorBoard, MLflow and W&B keep both values of such a step.)"""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) < len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, path)
    return len(lines) - len(kept)


class TensorBoardBackend:
    """``<out>/tensorboard``: the numeric fields of every training record as scalars."""

    def __init__(self, out: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"))

    def log_record(self, record: dict, prefix: str) -> None:
        for key, value in numbers({k: v for k, v in record.items() if k != "step"}).items():
            self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowBackend:
    """One MLflow run through ``MlflowClient`` (no process-global active run): reopened by
    id, or created in ``tracking.experiment`` with the config as parameters."""

    def __init__(self, cfg: Config, run_id: str | None, params: dict[str, Any]) -> None:
        from mlflow import MlflowClient

        self.uri = mlflow_uri(cfg)
        self.client = MlflowClient(tracking_uri=self.uri)
        if run_id is not None and self._exists(run_id):
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        name = cfg.tracking.experiment
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None and experiment.lifecycle_stage == "deleted":
            raise ValueError(f"MLflow experiment {name!r} is deleted in {self.uri}: restore it "
                             "or choose another `tracking.experiment`")
        experiment_id = (experiment.experiment_id if experiment is not None else
                         self.client.create_experiment(name, self._artifact_location()))
        run = self.client.create_run(
            experiment_id, run_name=run_name(cfg),
            tags={"elmm.run_dir": str(RunLayout.of(cfg).root)})
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(items), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=items[start:start + MLFLOW_BATCH])

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            log.warning("MLflow run %s is not in %s; starting a new one", run_id, self.uri)
            return False

    def _artifact_location(self) -> str | None:
        """Artifacts of a new experiment in a SQLite store: next to the database (MLflow's
        default is ``./mlruns`` of whichever process creates it)."""
        if self.uri.startswith("sqlite:///"):
            return str(Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts")
        return None

    def ref(self) -> dict:
        return {"uri": self.uri, "run_id": self.run_id}

    def log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(k, v, stamp, step or 0) for k, v in metrics.items()]
        for start in range(0, len(items), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=items[start:start + MLFLOW_BATCH])

    def log_artifact(self, path: Path, folder: str) -> None:
        self.client.log_artifact(self.run_id, str(path), folder or None)

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")


class WandbBackend:
    """One W&B run, resumed by id (``resume="allow"``); each metric prefix gets its own step
    axis (``train/step``), so a later stage never trips W&B's monotonic step."""

    def __init__(self, cfg: Config, run_id: str | None, config: dict) -> None:
        import wandb

        t = cfg.tracking
        self.directory = wandb_dir(cfg)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.run = wandb.init(
            project=t.wandb_project, entity=t.wandb_entity, name=run_name(cfg), id=self.run_id,
            resume="allow", mode=t.wandb_mode, dir=str(self.directory),
            config=config if run_id is None else None, reinit="create_new",
            settings=wandb.Settings(console="off", silent=True))
        self.axes: set[str] = set()

    def ref(self) -> dict:
        return {"project": self.run.project, "run_id": self.run_id,
                "mode": self.run.settings.mode}

    def log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        if step is None:
            self.run.summary.update(metrics)
            return
        prefixes = {k.rsplit("/", 1)[0] for k in metrics if "/" in k}
        for prefix in prefixes - self.axes:
            self.run.define_metric(f"{prefix}/step", hidden=True)
            self.run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")
            self.axes.add(prefix)
        self.run.log({**metrics, **{f"{p}/step": step for p in prefixes}})

    def log_artifact(self, path: Path, folder: str) -> None:
        target = Path(self.run.dir, folder, path.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        self.run.save(str(target), base_path=self.run.dir, policy="now")

    def close(self) -> None:
        self.run.finish()


# --- the tracker --------------------------------------------------------------------------------


def run_name(cfg: Config) -> str:
    return cfg.tracking.run_name or RunLayout.of(cfg).root.name


class Tracker:
    """The loggers of one process. ``log_record``: a training record (with ``step``) to
    every logger, its numbers under ``prefix/`` for MLflow/W&B; ``log_metrics``: results
    (``step=None``: a summary figure); ``log_artifact``: a file (MLflow/W&B only)."""

    def __init__(self, local: list, remote: list) -> None:
        self.local, self.remote = local, remote

    @property
    def active(self) -> bool:
        return bool(self.local or self.remote)

    def log_record(self, record: dict, prefix: str) -> None:
        for backend in self.local:
            backend.log_record(record, prefix)
        values = numbers({k: v for k, v in record.items() if k != "step"}, prefix)
        for backend in self.remote:
            backend.log_metrics(values, record["step"])

    def log_metrics(self, metrics: dict, prefix: str = "", step: int | None = None) -> None:
        values = numbers(metrics, prefix)
        for backend in self.remote:
            backend.log_metrics(values, step)

    def log_artifact(self, path: str | Path, folder: str = "") -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"artifact {path} does not exist")
        for backend in self.remote:
            backend.log_artifact(path, folder)

    def log_artifacts(self, paths: Iterable[str | Path], folder: str = "") -> None:
        for path in paths:
            self.log_artifact(path, folder)

    def close(self) -> None:
        for backend in (*self.local, *self.remote):
            backend.close()
        self.local, self.remote = [], []

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Sections and keys that a later command of the same run changes without making another
# experiment (`eval RUN eval.split=valid`, `export RUN --checkpoint best`, how a stage runs):
# left out of the tracking run's identity, still logged as parameters.
NOT_IDENTITY = ("eval", "export", "ray", "tune", "train.max_failures", "train.cpus_per_worker",
                "train.checkpoints_to_keep", "train.storage_path", "storage_endpoint",
                "images.num_cpus_per_task")


def identity_hash(config: dict) -> str:
    """The hash that names a tracking run: ``config`` without :data:`NOT_IDENTITY`."""
    import copy

    data = copy.deepcopy(config)
    for key in NOT_IDENTITY:
        *sections, leaf = key.split(".")
        node = data
        for section in sections:
            node = node.get(section, {})
        if isinstance(node, dict):
            node.pop(leaf, None)
    return config_hash(data)


def run_config(cfg: Config) -> Config:
    """The config of the command that runs in ``cfg``'s run directory: its ``config.yaml``
    (written before any stage runs) when there is one, else ``cfg``. A loop run with derived
    settings (pruning's fine-tuning) thus logs into the command's tracking run."""
    path = RunLayout.of(cfg).config_file
    return load_config(path) if path.is_file() else cfg


def open_tracker(cfg: Config, out: str | Path | None = None, *, resume: bool = False) -> Tracker:
    """The loggers of ``train.loggers`` for this process: with ``out`` (a training
    directory) also jsonl/tensorboard there (``resume``: append to its metrics.jsonl);
    MLflow/W&B reopen the tracking run of ``<run_dir>/tracking.json`` when it was made for
    the run's config (:func:`run_config`), else start one (and record it there)."""
    loggers = cfg.train.loggers
    local: list = []
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if "jsonl" in loggers:
            local.append(JsonlBackend(out, resume))
        if "tensorboard" in loggers:
            local.append(TensorBoardBackend(out))
    wanted = [name for name in REMOTE if name in loggers]
    if not wanted:
        return Tracker(local, [])
    layout = RunLayout.of(cfg)
    path = layout.path(TRACKING_FILE)
    config = tracked_config(run_config(cfg))
    key = identity_hash(config)
    record = read_json(path) if path.is_file() else {}
    if record.get("config_hash") != key:
        if record:
            log.info("%s records a tracking run of another config; starting a new one", path)
        record = {"config_hash": key}
    remote: list = []
    for name in wanted:
        known = record.get(name, {})
        run_id = known.get("run_id")
        if name == "mlflow":
            if known and known.get("uri") != mlflow_uri(cfg):
                run_id = None  # another store
            backend = MlflowBackend(cfg, run_id, flatten(config))
        else:
            backend = WandbBackend(cfg, run_id, config)
        remote.append(backend)
        record[name] = backend.ref()
    write_json_atomic(path, record)
    return Tracker(local, remote)

"""The Ray Train driver: a ``TorchTrainer`` over :func:`train_loop_per_worker`.

The run name and storage path are stable (``train.storage_path``, default
``<run_dir>/ray_train``; name ``LoopSpec.run_name``), so the same command after an
interruption resumes from the latest checkpoint; ``FailureConfig`` replaces dead workers
and restarts them from the last checkpoint. The storage may be object storage (``s3://``,
``gs://`` through ``pyarrow.fs``); everything else a run writes stays in the run directory,
which with several nodes must be a filesystem every node shares.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any

from elmm_ray.config import Config, ConfigError, config_to_dict
from elmm_ray.console import LoopProgress
from elmm_ray.data.kg import KnowledgeGraph
from elmm_ray.layout import RunLayout, absolute_paths, read_json
from elmm_ray.ray_session import init_ray
from elmm_ray.remote import join_uri, open_uri
from elmm_ray.train.checkpoint_integrity import verify_resume
from elmm_ray.train.context import backbone_source, prepare_backbone
from elmm_ray.train.loop import (
    MODEL_SUBDIR,
    LoopSpec,
    query_digest,
    train_local,
    train_loop_per_worker,
)

log = logging.getLogger(__name__)

# pyarrow's filesystem type names -> the URI scheme a user writes.
_FS_SCHEMES = {"s3": "s3", "gcs": "gs"}


def train_storage(cfg: Config) -> tuple[str, Any]:
    """Ray Train's ``storage_path`` and ``storage_filesystem`` (``None``: a local path) for
    ``cfg``: ``train.storage_path``, else ``<run_dir>/ray_train`` (on the object store itself
    when the run directory is there). An ``s3://`` or ``gs://`` location opens through
    ``pyarrow.fs`` (``storage_endpoint`` for an S3-compatible server; pyarrow also honours
    ``AWS_ENDPOINT_URL``); the filesystem object, endpoint included, travels to the
    controller and every worker. Credentials come from each node's environment. The
    location is checked from the driver first (the bucket exists and this process may write
    there), so a mistake fails here, naming the key."""
    location, key = cfg.train.storage_path, "train.storage_path"
    layout = RunLayout.of(cfg)
    if not location and layout.remote:
        location, key = join_uri(layout.remote.uri, "ray_train"), "run_dir"
    if not location:
        return str(layout.ray_train_storage), None
    if "://" not in location:
        return str(Path(location).expanduser().resolve()), None
    import pyarrow

    try:
        fs, path = open_uri(location, cfg.storage_endpoint)
        fs.create_dir(path)
    except (OSError, pyarrow.ArrowException) as err:
        endpoint = cfg.storage_endpoint or "AWS_ENDPOINT_URL / the provider's default"
        raise ConfigError([
            f"`{key}` = {location!r}: Ray Train's storage cannot be written from this "
            f"machine ({err}); check that the bucket exists, the credentials in the "
            "environment (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
            f"GOOGLE_APPLICATION_CREDENTIALS) and the endpoint ({endpoint}: `storage_endpoint`)"
            ]) from err
    return path, fs


def checkpoint_uri(checkpoint) -> str | None:
    """Where a Ray Train checkpoint lives: a local path or ``s3://`` / ``gs://`` URI."""
    if checkpoint is None:
        return None
    scheme = _FS_SCHEMES.get(getattr(checkpoint.filesystem, "type_name", ""))
    return f"{scheme}://{checkpoint.path}" if scheme else checkpoint.path


def build_trainer(cfg: Config, kg: KnowledgeGraph, spec: LoopSpec = LoopSpec(),
                  tune_trial: bool = False, progress_queue=None):
    """A ``TorchTrainer`` for ``cfg`` and ``spec`` (Ray must be initialised); inside a Ray
    Tune trial (``tune_trial``) every report also reaches Tune; rank 0 puts its progress
    records into ``progress_queue`` (a ``ray.util.queue.Queue``) when one is given."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = absolute_paths(cfg)
    layout = RunLayout.of(cfg)
    storage_path, storage_filesystem = train_storage(cfg)
    backbone_source(cfg, kg, layout)  # tokenizer + backbone written before any worker
    prepare_backbone(cfg)  # a hub checkpoint: fetched once on every node first
    tc = cfg.train
    # Every worker loads the KG itself (it validates on it) and takes its training queries
    # from it; their digest, checked there, makes a node with another copy of the dataset an
    # error instead of a different objective.
    digest = query_digest(kg.queries("train", tc.both_directions))
    resources = {"CPU": tc.cpus_per_worker}
    if tc.use_gpu:
        resources["GPU"] = 1
    env_vars = {"OMP_NUM_THREADS": str(tc.threads_per_worker)}
    if not tc.use_gpu:
        env_vars["DS_ACCELERATOR"] = "cpu"
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": config_to_dict(cfg), "spec": dataclasses.asdict(spec),
                           "progress": progress_queue, "queries_digest": digest},
        # N workers, or an elastic (MIN, MAX): the run starts with what the cluster gives
        # (>= MIN), grows when nodes join, goes on with the workers left when one is lost.
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=tc.resize_interval_s),
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        # No Ray Data dataset: every worker takes its own slice of each epoch's seeded
        # permutation of all training queries (QueryBatches), an exact, resumable data order;
        # a dataset would only ship the same few integers, at the cost of more processes per
        # fit and per restart (docs/architecture.md, "Data (Ray)").
        run_config=RunConfig(
            name=spec.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=tc.checkpoints_to_keep,
                                               checkpoint_score_attribute="val_mrr",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=tc.max_failures,
                                         max_preemption_failures=tc.max_preemptions),
            worker_runtime_env={"env_vars": env_vars},
            callbacks=_tune_callbacks() if tune_trial else None,
        ),
    )


def _tune_callbacks() -> list:
    from ray.tune.integration.ray_train import TuneReportCallback

    return [TuneReportCallback()]


def train_ray(cfg: Config, kg: KnowledgeGraph, spec: LoopSpec = LoopSpec(),
              tune_trial: bool = False, *, show_progress: bool = True,
              stage: str = "train") -> dict:
    """Train on Ray; returns a summary with the run's metrics history. With
    ``show_progress`` the driver shows rank 0's progress (sent through a Ray queue, so it
    works whatever node rank 0 runs on)."""
    init_ray(cfg.ray)
    storage, filesystem = train_storage(absolute_paths(cfg))
    if filesystem is None:
        # a local store is checked here; checkpoints on object storage are checked by each
        # worker on the local copy it resumes from
        verify_resume(Path(storage) / spec.run_name)
    RunLayout.of(cfg).push()  # a remote run directory: what the workers read, for every node
    started = time.time()
    with driver_progress(stage, show_progress and not tune_trial) as queue:
        trainer = build_trainer(cfg, kg, spec, tune_trial, queue)
        fit_called = time.time()
        result = trainer.fit()
        fit_returned = time.time()
    if result.error:
        raise RuntimeError(f"Ray Train run failed: {result.error}") from result.error
    layout = RunLayout.of(cfg)
    layout.pull(spec.out_subdir)  # rank 0 pushed its outputs (a remote run directory)
    out = layout.path(spec.out_subdir)
    _check_rank0_outputs(out, started)
    # Rank 0 wrote the run's summary (its history spans every attempt of a resumed run).
    summary = read_json(out / "summary.json")
    history = summary["history"]
    return {"steps": summary["steps"],
            "train_seconds": history[-1]["seconds"] if history else 0.0,
            "history": history, "losses": summary["losses"],
            "resumes": summary.get("resumes", []),
            "preemptions": summary.get("preemptions", []),
            "startup": startup_phases(summary.get("startup"), fit_called, fit_returned),
            "checkpoint": checkpoint_uri(result.checkpoint),
            "best_checkpoints": [(checkpoint_uri(c), m.get("val_mrr"))
                                 for c, m in (result.best_checkpoints or [])]}


def startup_phases(marks: dict[str, float] | None, fit_called: float,
                   fit_returned: float) -> dict[str, float]:
    """Where a ``TorchTrainer.fit`` spends the time outside its training loop, in seconds,
    from rank 0's start-up marks of its last attempt (``run_loop``'s ``startup``) and the
    driver's clock around ``fit()``: Ray Train's controller and worker group up to the
    worker process, the process's own start (Ray's worker, the train function's imports),
    the heavy imports, dataset, the training queries, model, the engine (and a checkpoint's
    load), the first step; after the last step, the outputs and Ray Train's shutdown.
    ``fixed`` is everything but the loop; in a run that restarted (a failure, a resize, a
    preemption) the first phase also holds the earlier attempts. With several nodes the
    clocks of two machines meet here (differences of milliseconds under NTP). Empty without
    marks; an attempt that took no step (resumed at its last) has no ``first_step``."""
    if not marks:
        return {}
    names = {"process": "to_worker_process", "entered": "worker_start", "imports": "imports",
             "dataset": "dataset", "queries": "queries", "model": "model", "engine": "engine",
             "first_step": "first_step"}
    phases, before = {}, fit_called
    for mark, name in names.items():
        if mark in marks:
            phases[name] = round(marks[mark] - before, 3)
            before = marks[mark]
    after = fit_returned - marks.get("last_step", marks["engine"])
    phases["after_last_step"] = round(after, 3)
    if "first_step" in marks:
        phases["to_first_step"] = round(marks["first_step"] - fit_called, 3)
    phases["fixed"] = round(marks["engine"] - fit_called + after, 3)
    phases["fit"] = round(fit_returned - fit_called, 3)
    return phases


# How much older than the start of fit() rank 0's summary may look (clocks of a shared
# filesystem's server and of this node differ a little) before it counts as another run's.
CLOCK_SLACK_S = 30.0


def _check_rank0_outputs(out: Path, started: float) -> None:
    """Rank 0 writes the trained weights and metrics into the run directory on its own node;
    the driver must see them (one machine, a run directory on object storage, or one every
    node shares), and see *this* run's: a summary older than the run is another run's,
    left in a run directory rank 0 could not write to from its node."""
    summary = out / "summary.json"
    if not (out / MODEL_SUBDIR / "trainable.json").is_file() or not summary.is_file():
        raise FileNotFoundError(
            f"Ray Train finished but the trained model is not in {out / MODEL_SUBDIR} on "
            "this machine: rank 0 writes it into the run directory on its own node. With "
            "several nodes, run_dir must be on object storage (s3://, gs://) or a filesystem "
            "every node mounts at the same path (NFS, a cluster filesystem)")
    age = started - summary.stat().st_mtime
    if age > CLOCK_SLACK_S:
        raise RuntimeError(
            f"Ray Train finished but {summary} is {age:.0f} s older than this run: it is an "
            "earlier run's, and rank 0's outputs of this one are not visible here (with "
            "several nodes, run_dir must be on object storage or a filesystem every node "
            "mounts at the same path)")


@contextlib.contextmanager
def driver_progress(stage: str, enabled: bool = True, progress=None):
    """A queue for rank 0's progress records and a driver thread handing them to
    ``progress`` (default: the console's :class:`LoopProgress`); drained before exit."""
    if not enabled:
        yield None
        return
    import ray
    from ray.util.queue import Empty, Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's node: a CPU-free actor may otherwise land on any node, and a spot
    # node's preemption would take rank 0's records (its preemption notice included) with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = Queue(maxsize=1000, actor_options={"num_cpus": 0, "scheduling_strategy": here})
    progress = progress or LoopProgress(stage)
    done = threading.Event()

    def show() -> None:
        while True:
            try:
                progress(queue.get(timeout=0.5))
            except Empty:
                if done.is_set():
                    return
            except Exception:  # the queue actor is gone: nothing more to show
                return

    thread = threading.Thread(target=show, name="train-progress", daemon=True)
    thread.start()
    try:
        yield queue
    finally:
        done.set()
        thread.join(timeout=5)
        if hasattr(progress, "close"):
            progress.close()
        with contextlib.suppress(Exception):
            ray.kill(queue.actor)


def train(cfg: Config, kg: KnowledgeGraph, spec: LoopSpec = LoopSpec(), ctx=None, *,
          show_progress: bool = True, tune_trial: bool = False, stage: str = "train") -> dict:
    """Train with ``train.backend``: the one loop in this process (``local``) or on Ray Train
    workers (``ray``). ``ctx`` (local only) trains an existing in-memory model;
    ``tune_trial``: every validation record is also reported to Ray Tune."""
    if cfg.train.backend == "local":
        report = None
        if tune_trial:
            from ray import tune

            report = tune.report
        return train_local(cfg, kg, spec, ctx, show_progress=show_progress, report=report,
                           stage=stage)
    if ctx is not None:
        raise ValueError("train.backend=ray builds the model on the workers; save it and "
                         "pass LoopSpec(init_model=...) instead of an in-memory context")
    return train_ray(cfg, kg, spec, tune_trial, show_progress=show_progress, stage=stage)

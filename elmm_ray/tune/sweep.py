"""``elmm-ray tune CONFIG --space SPACE``: a Ray Tune sweep over config keys.

The sweep shares upstream work: it finds the first stage of the pipeline that reads a
swept key, runs every stage before it once in the config's run directory, and each trial
(:func:`elmm_ray.tune.trial.run_trial`, a function trainable) links those outputs and runs
only the rest in ``<run_dir>/tune/trials/<trial_id>`` (a compression sweep shares data,
shards and features; a pruning sweep prunes copies of one trained base). Trials train on
Ray Train, or in their own process (``tune.trial_backend``: by default a trial of one CPU
worker), and report validation figures after every round, so ASHA can stop weak trials;
each finished trial reports its cost (visual tokens per query, LLM parameters, query
latency, peak memory).

Outputs under ``<run_dir>/tune/``: ``experiment/`` (the Tune experiment: rerunning the same
command resumes it, a finished sweep does no work), ``results.csv`` / ``results.parquet``,
``best_<metric>.yaml`` per objective (a config ``elmm-ray run`` accepts) and
``pareto.png`` (also logged to MLflow/W&B when ``train.loggers`` names them; each trial
logs its own tracking run into the sweep's store).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from elmm_ray.config import Config, config_hash, config_to_dict, dump_config
from elmm_ray.config.schema_train import max_workers
from elmm_ray.layout import RunLayout, absolute_paths, read_json, write_json_atomic
from elmm_ray.pipeline import pipeline_stages
from elmm_ray.ray_session import init_ray
from elmm_ray.stages import run_stages
from elmm_ray.stages.base import touches
from elmm_ray.tables import format_table
from elmm_ray.tracking import open_tracker, pin_tracking
from elmm_ray.tune.pareto import best_row, pareto_front, parse_objectives, plot_front
from elmm_ray.tune.space import SearchSpace
from elmm_ray.tune.trial import COMPLETE, TRIALS_SUBDIR, run_trial, trial_config

log = logging.getLogger(__name__)

EXPERIMENT = "experiment"
TABLE_METRICS = ("val_mrr", "val_hits1", "visual_tokens", "llm_params", "latency_ms",
                 "peak_rss_mb", "training_iteration", "trial_seconds")


@dataclass
class SweepResult:
    rows: list[dict]
    front: list[int]
    best: dict[str, Path]
    out_dir: Path
    shared_stages: list[str]
    trial_stages: list[str]
    # Wall seconds of the sweep's parts: the shared stages, Tuner.fit (every trial, Tune's
    # own start and bookkeeping), the outputs (table, best configs, Pareto plot, tracking).
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)


def split_stages(cfg: Config, keys: list[str]) -> tuple[list[str], list[str]]:
    """(stages run once for the whole sweep, stages each trial runs): the trial part starts
    at the first stage that reads a swept key and ends with training (or pruning)."""
    stages = [s for s in pipeline_stages(cfg) if s not in ("eval", "export")]
    if "prune" not in stages and any(k.startswith("prune.") for k in keys):
        stages.append("prune")
    first = next((i for i, s in enumerate(stages) if touches(s, keys)), None)
    if first is None:
        raise ValueError(f"no stage reads the swept keys {keys}: nothing would differ "
                         "between trials")
    return stages[:first], stages[first:]


def trial_backend(cfg: Config, shared: list[str] | None = None) -> str:
    """Where the sweep's trials train (``tune.trial_backend``). ``local``: the local loop in
    the trial's own process, on CPU, with the same global batch (the same objective as any
    number of Ray Train workers: the ZeRO parity tests) and no Ray Train worker group to start
    (~10 s of every fit here). ``auto`` picks it for trials of one CPU worker, where Ray Train
    adds only that start-up, unless training is one of the ``shared`` stages (a pruning
    sweep's base, which the run directory may hold already, trained under ``train.backend``:
    the backend is part of its fingerprint); else ``train.backend``."""
    choice = cfg.tune.trial_backend
    if choice == "local" and cfg.train.use_gpu:
        raise ValueError("tune.trial_backend=local trains each trial in its own process on "
                         "CPU, and train.use_gpu is true: use tune.trial_backend=ray or auto")
    if choice != "auto":
        return choice
    one_cpu_worker = max_workers(cfg.train) == 1 and not cfg.train.use_gpu
    trains_in_trials = "train" not in (shared or [])
    return "local" if one_cpu_worker and trains_in_trials else cfg.train.backend


def reuse_trial_actors(cfg: Config) -> bool:
    """Local trials run one after another in the same Tune actor: its process start and the
    imports of torch, transformers, peft and the loop are paid once, not per trial (4.4 s
    of imports a trial here: docs/architecture.md, Ray notes). Each trial seeds its own run
    and counts its own peak memory (:func:`elmm_ray.tune.trial.reset_peak_rss`, Linux; where
    the OS has no such reset, actors are not reused). A Ray Train trial keeps a process of
    its own: stopping it ends its Train workers."""
    return cfg.train.backend == "local" and os.access("/proc/self/clear_refs", os.W_OK)


def trial_resources(cfg: Config) -> dict:
    """What a trial's own process reserves: a local trial trains there (``tune.trial_cpus``,
    else the CPUs and threads of one training worker, at least 1); a Ray Train trial's
    workers reserve their own."""
    t = cfg.train
    local = max(1.0, t.cpus_per_worker, t.threads_per_worker)
    return {"cpu": cfg.tune.trial_cpus or (local if t.backend == "local" else 0.01)}


def _search_alg(cfg: Config):
    t = cfg.tune
    if t.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=t.metric, mode=t.mode,
                            sampler=optuna.samplers.TPESampler(seed=t.seed))
    if t.search == "optuna-nsga2":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        objectives = parse_objectives(t.objectives)
        return OptunaSearch(metric=[m for m, _ in objectives], mode=[d for _, d in objectives],
                            sampler=optuna.samplers.NSGAIISampler(seed=t.seed))
    return None  # random sampling or the grid: Tune's own variant generator


def _scheduler(cfg: Config):
    if cfg.tune.scheduler != "asha":
        return None
    from elmm_ray.tune.asha import ResumableASHA

    # time_attr: Tune's count of reports, i.e. validation rounds (plus the final report).
    return ResumableASHA(metric=cfg.tune.metric, mode=cfg.tune.mode,
                         grace_period=cfg.tune.grace_period,
                         reduction_factor=cfg.tune.reduction_factor, max_t=10**6)


def build_tuner(cfg: Config, space: SearchSpace, shared: list[str], stages: list[str]):
    """A ``Tuner`` over :func:`run_trial`, or the restored one when the experiment exists."""
    from ray import tune

    layout = RunLayout.of(cfg)
    path = layout.tune_dir / EXPERIMENT
    trainable = tune.with_resources(run_trial, trial_resources(cfg))
    if tune.Tuner.can_restore(str(path)):
        log.info("resuming the sweep in %s", path)
        return tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    param_space = {"base": config_to_dict(cfg), "shared": shared, "stages": stages,
                   **space.to_tune(grid=cfg.tune.search == "grid")}
    search = _search_alg(cfg)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(
            num_samples=cfg.tune.num_samples, search_alg=search, scheduler=_scheduler(cfg),
            max_concurrent_trials=cfg.tune.max_concurrent_trials,
            reuse_actors=reuse_trial_actors(cfg)),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(layout.tune_dir),
                                  verbose=0))


def collect_rows(grid, keys: list[str]) -> list[dict]:
    """One row per trial: its id, status, sampled values and last reported metrics."""
    rows = []
    for result in grid:
        metrics = dict(result.metrics or {})
        config = metrics.get("config") or (result.config or {})
        row = {"trial_id": metrics.get("trial_id") or Path(str(result.path)).name,
               "status": "done" if metrics.get(COMPLETE) else
               ("error" if result.error else "stopped")}
        row.update({k: config.get(k) for k in keys})
        row.update({m: metrics.get(m) for m in TABLE_METRICS})
        rows.append(row)
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def write_outputs(cfg: Config, rows: list[dict], keys: list[str]) -> tuple[list[int],
                                                                             dict[str, Path]]:
    """Results table (CSV + Parquet), best config per objective, Pareto plot."""
    import pandas as pd

    out = RunLayout.of(cfg).tune_dir
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "results.csv", index=False)
    frame.to_parquet(out / "results.parquet", index=False)
    objectives = parse_objectives(cfg.tune.objectives)
    done = [r for r in rows if r["status"] == "done"]
    front_done = pareto_front(done, objectives)
    front = [rows.index(done[i]) for i in front_done]
    best: dict[str, Path] = {}
    for metric, mode in objectives:
        index = best_row(done, metric, mode)
        if index is None:
            continue
        row = done[index]
        params = {k: row[k] for k in keys}
        name = f"best_{metric}"
        best_cfg = trial_config(cfg, params, Path(cfg.run_dir) / "tune" / name)
        path = dump_config(best_cfg, out / f"{name}.yaml")
        header = (f"# Launch: elmm-ray run {path}\n# Best trial by {metric} ({mode}) of the "
                  f"sweep in {out}: trial {row['trial_id']}, {metric} = {row[metric]}\n"
                  f"# train.backend={cfg.train.backend}: where the trial trained "
                  "(tune.trial_backend)\n")
        path.write_text(header + path.read_text())
        best[metric] = path
    if done:
        plot_front(rows, front, out / "pareto.png", metric=objectives[0][0],
                   costs=[m for m, _ in objectives[1:]] or ["visual_tokens"])
    with open_tracker(cfg) as tracker:
        tracker.log_artifacts([out / "results.csv", *best.values()], "tune")
        if done:
            tracker.log_artifact(out / "pareto.png", "tune")
    return front, best


def format_results(rows: list[dict], keys: list[str], front: list[int]) -> str:
    def show(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    columns = ["trial", "status", *keys, "val MRR", "tokens", "LLM params", "latency ms",
               "reports", "front"]
    table = [(r["trial_id"], r["status"], *(show(r[k]) for k in keys), show(r["val_mrr"]),
              show(r["visual_tokens"]), show(r["llm_params"]), show(r["latency_ms"]),
              show(r["training_iteration"]), "*" if i in front else "")
             for i, r in enumerate(rows)]
    return format_table(table, columns, title="sweep results (validation split)")


def check_same_sweep(cfg: Config, space: SearchSpace) -> None:
    """A sweep resumes only with the config and space it started with: its restored trials
    carry the old ones (and link the shared run's outputs)."""
    out = RunLayout.of(cfg).tune_dir
    record = {"params": space.params, **space.tune}
    digest = config_hash({"config": config_to_dict(cfg), "space": record})
    stamp = out / "sweep.json"
    if stamp.is_file() and (out / EXPERIMENT).exists():
        started = read_json(stamp)["fingerprint"]
        if started != digest:
            raise ValueError(f"{out} holds a sweep of another config or space (fingerprint "
                             f"{started}, now {digest}); give another run_dir, or delete "
                             f"{out} to start this sweep afresh")
    write_json_atomic(stamp, {"fingerprint": digest})
    (out / "space.yaml").write_text(yaml.safe_dump(record, sort_keys=False))


def run_sweep(cfg: Config, space: SearchSpace, *, show_progress: bool = True) -> SweepResult:
    """Run (or resume) the sweep of ``space`` over ``cfg``; see the module docstring."""
    # Trials run in their own run directories and log into the sweep's tracking store.
    cfg = pin_tracking(absolute_paths(space.apply(cfg)))
    keys = list(space.params)
    # The whole sweep trains where tune.trial_backend says (a pruning sweep's shared base
    # too, so the trials' fingerprints match it; the best-config YAMLs reproduce the trials).
    backend = trial_backend(cfg, split_stages(cfg, keys)[0])
    if backend != cfg.train.backend:
        log.info("the sweep trains with train.backend=%s (tune.trial_backend=%s)", backend,
                 cfg.tune.trial_backend)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, backend=backend))
    shared, stages = split_stages(cfg, keys)
    layout = RunLayout.of(cfg)
    layout.pull()  # run_dir on object storage: the sweep so far, into this node's mirror
    layout.tune_dir.mkdir(parents=True, exist_ok=True)
    check_same_sweep(cfg, space)
    seconds = {}
    start = time.perf_counter()
    if shared:
        run_stages(shared, cfg, show_progress=show_progress)
    seconds["shared_stages"] = time.perf_counter() - start
    if layout.remote:
        # The trials and Ray Tune work in this node's mirror (one node), pushed at the end.
        cfg = dataclasses.replace(cfg, run_dir=str(layout.root))
    # The sweep's own tracking run (and store, experiment) exist before trials run at once.
    open_tracker(cfg).close()
    init_ray(cfg.ray)
    try:
        start = time.perf_counter()
        grid = build_tuner(cfg, space, shared, stages).fit()
        seconds["tuner_fit"] = time.perf_counter() - start
        start = time.perf_counter()
        rows = collect_rows(grid, keys)
        front, best = write_outputs(cfg, rows, keys)
        seconds["outputs"] = time.perf_counter() - start
    except BaseException:
        with contextlib.suppress(Exception):  # the sweep's own error is the one to report
            layout.push()
        raise
    layout.push()
    return SweepResult(rows, front, best, layout.tune_dir, shared, stages, seconds)


__all__ = ["EXPERIMENT", "TRIALS_SUBDIR", "SweepResult", "format_results", "run_sweep",
           "split_stages"]

"""Stages as units: each declares its name, the config keys it reads, the stages it
consumes and its run function; :func:`run_stage` runs a stage and, first, every upstream
stage it needs, skipping the complete ones.

Skip decisions use one scheme (:func:`elmm_ray.layout.fingerprint`): a stage is complete
when its manifest says ``complete`` with the fingerprint of the config values it reads and
of its inputs (each upstream stage's fingerprint and the id of the run that made its
outputs), and its outputs exist. A changed key re-runs that stage and everything
downstream of it; an upstream stage that had to run again (its outputs were lost) re-runs
its consumers; nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from elmm_ray import console
from elmm_ray.config import Config
from elmm_ray.data.dataset import load_dataset
from elmm_ray.data.kg import KnowledgeGraph
from elmm_ray.layout import (
    RunLayout,
    absolute_paths,
    changed_keys,
    fingerprint,
    fingerprint_values,
)
from elmm_ray.models.build import reads_images

log = logging.getLogger(__name__)


@dataclass
class StageContext:
    """What a stage's run function gets: the config, the layout, the KG (loaded once and
    shared by the stages of one command) and the results of the stages already run."""

    cfg: Config
    show_progress: bool = True
    tune_trial: bool = False  # inside a Ray Tune trial: training reports to Tune
    fingerprint: str = ""  # of the stage being run (names its Ray Train runs)
    results: dict[str, StageResult] = field(default_factory=dict)
    _kg: KnowledgeGraph | None = None

    @property
    def layout(self) -> RunLayout:
        return RunLayout.of(self.cfg)

    @property
    def kg(self) -> KnowledgeGraph:
        if self._kg is None:
            self._kg = load_dataset(self.cfg)
        return self._kg


@dataclass(frozen=True)
class StageResult:
    name: str
    manifest: dict
    skipped: bool
    seconds: float


@dataclass(frozen=True)
class Stage:
    """A unit of the pipeline.

    ``reads``: dotted config keys or sections whose values its outputs depend on
    (``exclude``: keys inside them that do not, such as test hooks); ``needs(cfg)``: the
    upstream stages whose outputs it consumes; ``run(ctx)``: does the work and returns the
    manifest payload; ``outputs_exist(layout, cfg)``: whether its outputs are on disk;
    ``artifacts``: its outputs at their default places, relative to the run directory
    (what a Tune trial links from the sweep's shared run instead of recomputing)."""

    name: str
    reads: tuple[str, ...]
    needs: Callable[[Config], tuple[str, ...]]
    run: Callable[[StageContext], dict]
    outputs_exist: Callable[[RunLayout, Config], bool]
    exclude: tuple[str, ...] = ()
    artifacts: tuple[str, ...] = ()
    describe: Callable[[dict], str] | None = None  # one line on the console from the payload


STAGES: dict[str, Stage] = {}

# Keys that change how a training stage runs, not what it computes: never a reason to redo it.
# Keys that say how a run executes, not what it computes: outside every stage's fingerprint.
# The worker count and GPUs among them: the objective is the global batch's at any world size
# and a checkpoint resumes at any worker count (figures equal within float rounding).
RUN_ONLY_KEYS = ("train.fail_at_step", "train.step_delay_s", "train.max_failures",
                 "train.cpus_per_worker",
                 "train.num_workers", "train.use_gpu", "train.threads_per_worker",
                 "train.max_preemptions", "train.resize_interval_s",
                 "train.checkpoints_to_keep", "train.loggers", "images.num_cpus_per_task",
                 "images.max_shard_bytes", "eval.workers", "train.storage_path",
                 "storage_endpoint")


def register(stage: Stage) -> Stage:
    STAGES[stage.name] = stage
    return stage


def data_stages(cfg: Config) -> tuple[str, ...]:
    """The stage that makes the dataset folder: ``synth`` for the synthetic KG, else none."""
    return ("synth",) if cfg.dataset.name == "synthetic" else ()


def image_stage(cfg: Config) -> tuple[str, ...]:
    """What a model of ``cfg`` reads its images from: the feature store (``extract``), or
    nothing beyond the dataset when it reads no images."""
    if reads_images(cfg) and cfg.images.max_images_per_entity > 0:
        return ("extract",)
    return data_stages(cfg)


def plan(name: str, cfg: Config) -> list[str]:
    """``name`` and every stage upstream of it, in the order they run."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    order: list[str] = []

    def visit(stage: str, path: tuple[str, ...]) -> None:
        if stage in path:
            raise ValueError(f"stage cycle: {' -> '.join((*path, stage))}")
        if stage in order:
            return
        for upstream in STAGES[stage].needs(cfg):
            visit(upstream, (*path, stage))
        order.append(stage)

    visit(name, ())
    return order


def touches(stage: str, keys: list[str]) -> bool:
    """Whether any dotted config key of ``keys`` is one that ``stage`` reads."""
    reads = STAGES[stage].reads
    return any(key == r or key.startswith(f"{r}.") or r.startswith(f"{key}.")
               for key in keys for r in reads)


def stage_fingerprint(name: str, cfg: Config, digests: dict[str, str]) -> str:
    stage = STAGES[name]
    inputs = {n: digests[n] for n in stage.needs(cfg)}
    return fingerprint(cfg, stage.reads, inputs, stage.exclude)


def run_stages(names: list[str], cfg: Config, *, show_progress: bool = True,
               kg: KnowledgeGraph | None = None, tune_trial: bool = False,
               must_be_complete: tuple[str, ...] = ()) -> dict[str, StageResult]:
    """Run ``names`` and everything upstream of them, each at most once, skipping complete
    stages. The resolved config is written into the run directory first.
    ``must_be_complete``: stages whose outputs are linked from elsewhere (a sweep's shared
    run): refused rather than run, which would write through the links."""
    cfg = absolute_paths(cfg)
    layout = RunLayout.of(cfg)
    if layout.remote:  # work in the local mirror of the run directory on object storage
        layout.remote.check_writable()
        layout.pull()
    layout.write_config(cfg)
    layout.push()
    try:
        results = _run_planned(names, cfg, layout, StageContext(cfg, show_progress, tune_trial,
                                                                _kg=kg), must_be_complete)
    except BaseException:
        with contextlib.suppress(Exception):  # the stage's own error is the one to report
            layout.push()  # what the failed stage left: logs, partial outputs
        raise
    layout.push()
    return results


def _run_planned(names: list[str], cfg: Config, layout: RunLayout, ctx: StageContext,
                 must_be_complete: tuple[str, ...]) -> dict[str, StageResult]:
    digests: dict[str, str] = {}
    order: list[str] = []
    for name in names:
        order += [s for s in plan(name, cfg) if s not in order]
    for name in order:
        stage = STAGES[name]
        digest = stage_fingerprint(name, cfg, digests)
        if layout.is_complete(name, digest) and stage.outputs_exist(layout, cfg):
            console.say(name, f"complete (fingerprint {digest}): skipped",
                        enabled=ctx.show_progress)
            manifest = layout.read_manifest(name)
            # Downstream stages see which run of this stage they consume: an upstream stage
            # that runs again (its outputs were lost) makes its consumers run again too.
            digests[name] = f"{digest}:{manifest.get('run_id', '')}"
            ctx.results[name] = StageResult(name, manifest, True, 0.0)
            continue
        if name in must_be_complete:
            raise RuntimeError(f"stage {name} should be complete in {layout.root} (its outputs "
                               "are linked from a shared run) but is not: was the shared run "
                               "changed after the sweep started?")
        values = fingerprint_values(cfg, stage.reads, stage.exclude)
        _say_why_again(name, layout.read_manifest(name) or {}, digest, values, digests, ctx)
        # Until it completes, the stage's outputs are no longer those of its old manifest.
        layout.write_manifest(name, {"status": "running", "fingerprint": digest,
                                     "config": values})
        layout.push()  # workers on other nodes pull the upstream outputs from there
        ctx.fingerprint = digest
        start = time.perf_counter()
        payload = stage.run(ctx)
        seconds = time.perf_counter() - start
        summary = stage.describe(payload) if stage.describe else ""
        console.say(name, f"done in {seconds:.1f} s" + (f": {summary}" if summary else ""),
                    enabled=ctx.show_progress)
        manifest = {"status": "complete", "fingerprint": digest, "run_id": uuid.uuid4().hex,
                    "config": values, "inputs": {n: digests[n] for n in stage.needs(cfg)},
                    "seconds": seconds, **payload}
        layout.write_manifest(name, manifest)
        layout.push()  # outputs first, the manifest last: complete remotely only when whole
        digests[name] = f"{digest}:{manifest['run_id']}"
        ctx.results[name] = StageResult(name, {"stage": name, **manifest}, False, seconds)
    return ctx.results


def _say_why_again(name: str, old: dict, digest: str, values: dict, digests: dict,
                   ctx: StageContext) -> None:
    """A stage that ran before under another fingerprint runs anew: say which config keys
    changed (or that its inputs did) on the console, never a silent restart. The train
    stage's new fingerprint names a new Ray Train run: training starts from step 0."""
    if not old.get("fingerprint") or old["fingerprint"] == digest:
        return
    changes = changed_keys(old.get("config") or {}, values) if "config" in old else []
    if changes:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes[:6])
        why = f"changed since its last run ({shown}{', ...' if len(changes) > 6 else ''})"
    elif "config" in old and old.get("inputs") and any(
            old["inputs"].get(n) != digests.get(n) for n in old["inputs"]):
        why = "its inputs changed since its last run (an upstream stage ran again)"
    else:
        why = "its config or inputs changed since its last run"
    fresh = " (a new training run from step 0)" if name == "train" else ""
    console.say(name, f"runs again{fresh}: {why}", enabled=ctx.show_progress)


def run_stage(name: str, cfg: Config, *, show_progress: bool = True,
              kg: KnowledgeGraph | None = None) -> StageResult:
    """Run stage ``name`` (after whatever it needs) and return its result."""
    return run_stages([name], cfg, show_progress=show_progress, kg=kg)[name]

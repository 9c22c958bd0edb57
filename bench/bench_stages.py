"""Where each stage of the pipeline runs (driver / Ray worker) and its peak memory.

The pipeline of ``configs/demo.yaml`` (``--quick``: the tiny test settings of
``tests/tiny.py``) with magnitude pruning, run stage by stage (``run_stage`` with one config,
so each stage skips the ones before it) in a fresh driver process per backend:

- ``train.backend=ray``: the driver runs with ``ELMM_ORCHESTRATOR_PID`` set to its own pid
  (``elmm_ray/models/build.py`` raises if it builds the ELMM); every stage must pass;
- ``train.backend=local``: the contrast, train / eval / prune / export in the driver.

For each stage a thread of the driver samples every ``--interval`` s (psutil): the driver's
RSS, and the RSS and title of every process under it. Ray titles its worker processes
``ray::<TaskOrActor>`` (``ray::IDLE`` when idle); a worker counts as busy for a stage when a
sample saw it with a title other than its title at the stage's start. Ray's own processes
(raylet, gcs_server, dashboard, log_monitor, agents) and the bookkeeping actors of Ray Data /
Ray Train (``RAY_HELPERS``) are not workers of a stage (their peaks are in the JSON).
Besides, the driver counts the ELMMs and Llava backbones constructed in it (a wrapper around
their ``__init__``).

Sampling misses what lives or peaks between two samples (a pack task of the tiny data lasts
milliseconds); the driver's lifetime peak (``ru_maxrss``) is recorded too.

    .venv/bin/python bench/bench_stages.py --quick       # tiny settings, ~3 min
    .venv/bin/python bench/bench_stages.py               # configs/demo.yaml, 2 epochs
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import REPO_ROOT, RESULTS, peak_rss_mb, save  # noqa: E402

MB = 2**20
IDLE = "ray::IDLE"
# Ray's own processes: never workers of a stage, whatever they hold.
RAY_SYSTEM = ("raylet", "gcs_server", "dashboard", "log_monitor", "agent", "monitor.py",
              "runtime_env", "ray_client_server")
# Actors of Ray itself and of its libraries (Ray Data / Ray Train bookkeeping): they live
# across stages, hold no model, and are reported apart from the stage's workers.
RAY_HELPERS = ("DashboardAgent", "RuntimeEnvAgent", "_StatsActor",
               "_AutoscalingCoordinatorActor", "ActorLocationTracker", "DatasetManager",
               "PlacementGroupCleaner", "PreemptionWatcher", "SynchronizationActor",
               "TrainController", "SplitCoordinator")
PRUNE = ["prune.method=magnitude", "prune.ratio=0.3", "prune.steps=1"]


def process_title(cmdline: list[str], name: str) -> str:
    """What a process calls itself: its command line (Ray's ``ray::<Name>`` title
    replaces it), else its name."""
    return " ".join(cmdline).strip() or name


def short_title(title: str) -> str:
    """``title`` with every path cut to its file name (results never name this machine's
    directories), at most 80 characters."""
    return " ".join(token.rsplit("/", 1)[-1] if "/" in token else token
                    for token in title.split())[:80]


def worker_label(title: str) -> str:
    """The task or actor of a Ray worker's title, without Ray's prefix, the method an actor
    is running or an operator's arguments: ``ray::RayTrainWorker.run_train_fn`` ->
    ``RayTrainWorker``, ``ray::MapWorker(MapBatches(_TowerActor)).submit`` ->
    ``MapWorker(MapBatches(_TowerActor))``, ``ray::Name:Class`` -> ``Class``."""
    label = title.split()[0].removeprefix("ray::")
    if ":" in label.split("(")[0]:  # a named actor: ``Name:Class``
        label = label.split(":", 1)[1]
    if ")." in label:
        return label[:label.index(").") + 1]
    head = label.split("[")[0]
    return head.split(".")[0] if "(" not in head.split(".")[0] else head


def classify(title: str) -> str:
    """``worker`` / ``idle`` for a Ray worker process (``ray::...``), ``helper`` for Ray's
    and its libraries' own actors, ``system`` for Ray's own processes, ``other`` for
    anything else under the driver."""
    if title.startswith("ray::"):
        if title.split()[0] == IDLE:
            return "idle"
        return "helper" if worker_label(title) in RAY_HELPERS else "worker"
    return "system" if any(part in title for part in RAY_SYSTEM) else "other"


@dataclass
class StageSample:
    """What the sampler saw during one stage. A worker counts as busy in the stage when a
    sample saw it with a title other than the one it had when the stage began (an idle
    worker taking a task, an actor running a method) or it was not there then."""

    driver_peak: int = 0
    any_worker_peak: int = 0  # idle ones included (a reused worker keeps what it imported)
    helper_peak: int = 0
    system_peak: int = 0
    other_peak: int = 0
    other_names: set[str] = field(default_factory=set)
    samples: int = 0
    peaks: dict[int, int] = field(default_factory=dict)  # worker pid -> peak RSS
    labels: dict[int, dict[str, int]] = field(default_factory=dict)  # pid -> label -> seen
    busy: set[int] = field(default_factory=set)

    @property
    def worker_peak(self) -> int:
        """The peak RSS of the largest busy worker (0: none was busy)."""
        return max((self.peaks[pid] for pid in self.busy), default=0)

    def busy_workers(self) -> dict[str, dict]:
        """Busy workers by task / actor: how many processes, the largest one's peak RSS."""
        out: dict[str, dict] = {}
        for pid in self.busy:
            seen = self.labels[pid]
            label = max(seen, key=lambda k: seen[k])  # an actor's name beats its methods'
            entry = out.setdefault(label, {"processes": 0, "peak_rss_mb": 0.0})
            entry["processes"] += 1
            entry["peak_rss_mb"] = max(entry["peak_rss_mb"], mb(self.peaks[pid]))
        return dict(sorted(out.items()))


class Sampler:
    """A thread sampling the driver and the processes under it until the ``with`` ends."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.me = psutil.Process()
        self.seen = StageSample()
        self.at_start: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="rss-sampler")

    def __enter__(self) -> Sampler:
        self.at_start = {pid: title for pid, title, _ in self._processes()}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()  # the state at the stage's end

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def _processes(self) -> list[tuple[int, str, int]]:
        out = []
        for proc in self.me.children(recursive=True):
            try:
                out.append((proc.pid, process_title(proc.cmdline(), proc.name()),
                            proc.memory_info().rss))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue  # gone between listing and reading: a finished task
        return out

    def _sample(self) -> None:
        seen = self.seen
        seen.samples += 1
        seen.driver_peak = max(seen.driver_peak, self.me.memory_info().rss)
        for pid, title, rss in self._processes():
            kind = classify(title)
            if kind == "system":
                seen.system_peak = max(seen.system_peak, rss)
            elif kind == "other":
                seen.other_peak = max(seen.other_peak, rss)
                seen.other_names.add(short_title(title))
            elif kind == "helper":
                seen.helper_peak = max(seen.helper_peak, rss)
            else:
                seen.any_worker_peak = max(seen.any_worker_peak, rss)
                seen.peaks[pid] = max(seen.peaks.get(pid, 0), rss)
            if kind == "worker":
                labels = seen.labels.setdefault(pid, {})
                label = worker_label(title)
                labels[label] = labels.get(label, 0) + 1
                if self.at_start.get(pid) != title:
                    seen.busy.add(pid)


class BuildCounter:
    """Counts the ELMMs and Llava backbones constructed in this process."""

    def __init__(self) -> None:
        from transformers import LlavaForConditionalGeneration

        from elmm_ray.models.elmm import ELMM

        self.counts = {"elmm": 0, "backbone": 0}
        for key, cls in (("elmm", ELMM), ("backbone", LlavaForConditionalGeneration)):
            cls.__init__ = self._counting(key, cls.__init__)

    def _counting(self, key: str, init):
        @functools.wraps(init)
        def wrapper(obj, *args, **kwargs):
            self.counts[key] += 1
            return init(obj, *args, **kwargs)
        return wrapper

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


def overrides(quick: bool, backend: str, epochs: int, run_dir: str) -> list[str]:
    """The config overrides of one run of the bench."""
    # preset tiny: the random tower results/stages.json was measured with (quick: tiny-test)
    common = [f"run_dir={run_dir}", "model.preset=tiny", f"train.backend={backend}",
              f"train.epochs={epochs}", "ray.num_cpus=2", *PRUNE]
    if quick:
        from tests.tiny import TINY_DATA, TINY_MODEL

        return [*common, *TINY_DATA, *TINY_MODEL, "train.num_workers=1",
                "train.cpus_per_worker=1", "train.global_batch_size=16", "eval.batch_size=64",
                "prune.finetune_steps=2", "prune.calib_samples=8"]
    return [*common, "prune.finetune_steps=4", "prune.calib_samples=16"]


def mb(n: int) -> float:
    return round(n / MB, 1)


def row(stage: str, seconds: float, seen: StageSample, built: dict[str, int],
        skipped: bool = False) -> dict:
    busy = seen.busy_workers()
    return {"stage": stage, "seconds": round(seconds, 2), "skipped": skipped,
            "driver_peak_rss_mb": mb(seen.driver_peak),
            "driver_lifetime_peak_rss_mb": round(peak_rss_mb(), 1),
            "worker_peak_rss_mb": mb(seen.worker_peak) if busy else None,
            "any_worker_peak_rss_mb": mb(seen.any_worker_peak),
            "ray_helper_actor_peak_rss_mb": mb(seen.helper_peak),
            "ray_system_peak_rss_mb": mb(seen.system_peak),
            "other_child_peak_rss_mb": mb(seen.other_peak),
            "other_children": sorted(seen.other_names),
            "busy_workers": busy, "built_in_driver": built, "samples": seen.samples}


def child(args: argparse.Namespace) -> int:
    """One backend's run, in this (fresh) process: the driver being measured."""
    start = time.perf_counter()
    if args.child == "ray":  # the model must not be built here; workers have other pids
        os.environ["ELMM_ORCHESTRATOR_PID"] = str(os.getpid())
    rows = []
    with Sampler(args.interval) as sampler:
        from elmm_ray.config import load_config
        from elmm_ray.layout import absolute_paths
        from elmm_ray.pipeline import pipeline_stages
        from elmm_ray.ray_session import init_ray
        from elmm_ray.stages import run_stage

        counter = BuildCounter()
    rows.append(row("(imports)", time.perf_counter() - start, sampler.seen, counter.snapshot()))
    run_dir = tempfile.mkdtemp(prefix=f"elmm_stages_{args.child}_")
    try:
        cfg = absolute_paths(load_config(str(REPO_ROOT / "configs/demo.yaml"),
                                         overrides(args.quick, args.child, args.epochs,
                                                   run_dir)))
        stages = pipeline_stages(cfg)
        before = counter.snapshot()
        start = time.perf_counter()
        with Sampler(args.interval) as sampler:
            init_ray(cfg.ray)
        rows.append(row("(ray.init)", time.perf_counter() - start, sampler.seen,
                        _delta(counter.snapshot(), before)))
        for name in stages:
            before = counter.snapshot()
            start = time.perf_counter()
            with Sampler(args.interval) as sampler:
                result = run_stage(name, cfg, show_progress=False)
            rows.append(row(name, time.perf_counter() - start, sampler.seen,
                            _delta(counter.snapshot(), before), result.skipped))
            print(f"[{args.child}] {name}: {rows[-1]['seconds']} s, driver "
                  f"{rows[-1]['driver_peak_rss_mb']} MB, workers "
                  f"{sorted(rows[-1]['busy_workers'])}", file=sys.stderr, flush=True)
    finally:
        import ray

        ray.shutdown()
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    Path(args.json).write_text(json.dumps({"backend": args.child, "rows": rows,
                                           "driver_pid_guard": args.child == "ray",
                                           "stages": stages}, indent=2))
    return 0


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def runs_on(r: dict) -> str:
    """The table's "runs on" cell: the driver (and what it built), the busy Ray workers."""
    built = [f"{n} {k}" for k, n in r["built_in_driver"].items() if n]
    where = [f"driver (built {', '.join(built)})" if built else "driver"]
    where += [f"{name} x{b['processes']}" for name, b in r["busy_workers"].items()]
    return " + ".join(where)


def table(backend: str, rows: list[dict]) -> list[str]:
    lines = [f"**train.backend={backend}**", "",
             "| stage | runs on | driver peak RSS MB | worker peak RSS MB | seconds |",
             "|---|---|---|---|---|"]
    for r in rows:
        worker = "-" if r["worker_peak_rss_mb"] is None else f"{r['worker_peak_rss_mb']:.0f}"
        lines.append(f"| {r['stage']} | {runs_on(r)} | {r['driver_peak_rss_mb']:.0f} | "
                     f"{worker} | {r['seconds']:.1f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny test settings")
    parser.add_argument("--epochs", type=int, default=2, help="train.epochs (demo: 10)")
    parser.add_argument("--interval", type=float, default=0.15, help="sampling period, s")
    parser.add_argument("--backends", default="ray,local")
    parser.add_argument("--output", default="")
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    parser.add_argument("--child", choices=("ray", "local"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in ("ray", "local")]
    if unknown or not backends:
        parser.error(f"--backends: {unknown or 'none'}; allowed: ray, local")
    output = args.output or ("stages_quick" if args.quick else "stages")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    results = {}
    for backend in backends:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            out = tmp.name
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", backend, "--json", out,
               "--epochs", str(args.epochs), "--interval", str(args.interval)]
        cmd += ["--quick"] * args.quick + ["--keep"] * args.keep
        proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT)
        if proc.returncode != 0:
            print(f"the {backend} run failed (exit {proc.returncode})", file=sys.stderr)
            return proc.returncode
        results[backend] = json.loads(Path(out).read_text())
        os.unlink(out)
    lines = [f"Stages of `{'tests/tiny.py settings' if args.quick else 'configs/demo.yaml'}` "
             f"(train.epochs={args.epochs}, {', '.join(PRUNE)}), tiny CPU model, "
             f"RSS sampled every {args.interval} s.", ""]
    for backend, res in results.items():
        lines += [*table(backend, res["rows"]), ""]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{output}.md").write_text(text)
    save(output, {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                  "args": vars(args), "load_average_end": os.getloadavg()[0],
                  "total_memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                  "backends": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ray's autoscaler on this machine (tests/autoscaling.py: the fake multi-node provider, a
head with no CPUs, worker nodes of 1 CPU launched on demand and released when idle), one
cluster shared by every test here:

- `ray job submit` of jobs/run.py (the tiny run), as docs/cluster.md says, on a cluster with
  no worker node: nodes launched on demand, released once idle; the client makes the
  cluster's token file private;
- an `elmm-ray tune` sweep scales up to the node limit and back down;
- `elmm-ray run` with `ray.address` of an elastic run (`train.num_workers=[1, 2]`) with a
  node drained as preempted (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`, then
  reclaimed at its deadline) and a node killed outright: it finishes, every step once except
  those after the last checkpoint registered before the kill, no step redone after the
  preemption (the just-in-time checkpoint), the figures of an uninterrupted one-process run,
  the nodes released afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from elmm_ray.config import load_config
from elmm_ray.data.dataset import load_dataset
from elmm_ray.layout import RunLayout, absolute_paths
from elmm_ray.stages import run_stages
from elmm_ray.stages.train import evaluate
from elmm_ray.train.context import load_trained_context
from tests.autoscaling import LocalAutoscalingCluster, fault_restarts, run_with_faults
from tests.parity import assert_metrics_within_score_noise, assert_weights_match
from tests.tiny import TINY_DATA, TINY_MODEL

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")
IDLE_TIMEOUT_S = 8.0
MAX_NODES = 3
# The tiny run on Ray Train workers of 1 CPU (one per worker node), the figures of which a
# one-process run of the same global batch reproduces (no LoRA dropout: each rank draws its
# own masks).
TINY_RAY = [*TINY_DATA, *TINY_MODEL, "train.backend=ray", "train.cpus_per_worker=1",
            "train.global_batch_size=16", "train.learning_rate=0.003",
            "train.num_negatives=8", "lora.dropout=0", "eval.batch_size=64",
            "train.val_max_queries=40", "ray.data_actor_cpus=1"]


@pytest.fixture(scope="module")
def cluster():
    c = LocalAutoscalingCluster({"cpu_worker": {"resources": {"CPU": 1}}},
                                max_workers=MAX_NODES, idle_timeout_s=IDLE_TIMEOUT_S).start()
    try:
        yield c
    finally:
        c.stop()
    assert not c.own_processes()


class NodeWatch:
    """Counts the cluster's worker nodes every second in a thread: the most seen."""

    def __init__(self, cluster: LocalAutoscalingCluster) -> None:
        self.cluster, self.most, self._stop = cluster, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.most = max(self.most, len(self.cluster.worker_nodes()))
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(1.0)

    def __enter__(self) -> NodeWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=90)


def _cli(cluster, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "elmm_ray.cli", *args],
                          env=cluster.env(), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _trainable(cfg) -> dict[str, torch.Tensor]:
    out = {}
    for f in ("adapter.safetensors", "trainable.safetensors"):
        out.update(load_file(str(RunLayout.of(cfg).trained_model / f)))
    return out


def _matches_one_process(cfg, overrides: list[str], tmp_path: Path) -> dict:
    """Train ``cfg`` (made of ``overrides``) again in this process (the local backend, one
    process, the same global batch and data) and compare: weights and test metrics within
    the tolerances of tests/parity.py."""
    reference = absolute_paths(load_config(DEMO, [
        *overrides, f"run_dir={tmp_path / 'one_process'}", "train.backend=local",
        "train.step_delay_s=0"]))
    run_stages(["train"], reference, show_progress=False)
    assert_weights_match(_trainable(cfg), _trainable(reference))
    kg = load_dataset(cfg)
    metrics = evaluate(cfg, kg, load_trained_context(cfg, kg))
    return assert_metrics_within_score_noise(load_trained_context(reference, kg),
                                             load_trained_context(cfg, kg), kg, metrics)


def _config(run_dir: Path, *overrides: str):
    """The config of a run and its overrides (the run directory left out)."""
    every = [*TINY_RAY, *overrides]
    return absolute_paths(load_config(DEMO, [f"run_dir={run_dir}", *every])), every


def test_ray_job_submit_launches_nodes_and_releases_them(cluster, tmp_path):
    """`ray job submit -- python jobs/run.py --config ...` against the cluster's dashboard
    with the cluster's token (RAY_AUTH_MODE=token), as docs/cluster.md says: the autoscaler
    launches a node for the work, the job succeeds, the node goes once idle, and the job's
    client (init_ray) made the token file, left 0644 as Ray leaves it, private."""
    cluster.wait_for_workers(0, timeout_s=IDLE_TIMEOUT_S + 60)
    cluster.token_file.chmod(0o644)
    run_dir = tmp_path / "job"
    ray_bin = str(Path(sys.executable).with_name("ray"))
    with NodeWatch(cluster) as watch:
        done = subprocess.run(
            [ray_bin, "job", "submit", f"--address=http://127.0.0.1:{cluster.dashboard_port}",
             "--runtime-env", "cluster/runtime_env.yaml", "--", sys.executable, "jobs/run.py",
             "--config", DEMO, f"run_dir={run_dir}", *TINY_RAY, "train.num_workers=1",
             "train.epochs=1", "model.entity_repr=table"],
            env=cluster.env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout and "[eval] done" in done.stdout
    assert RunLayout(run_dir).metrics_file("test").is_file()
    assert watch.most >= 1
    assert cluster.token_file.stat().st_mode & 0o777 == 0o600
    cluster.wait_for_workers(0, timeout_s=IDLE_TIMEOUT_S + 60)


def test_a_sweep_scales_up_to_the_node_limit_and_back_down(cluster, tmp_path):
    """`elmm-ray tune`, three local-backend trials of 1 CPU each: the autoscaler adds nodes
    up to its limit of three, every trial finishes, and the cluster empties again."""
    space = tmp_path / "lr.yaml"
    space.write_text("search: grid\nnum_samples: 1\nparams:\n"
                     "  train.learning_rate: {type: choice, values: [0.003, 0.001, 0.0003]}\n")
    run_dir = tmp_path / "sweep"
    with NodeWatch(cluster) as watch:
        done = _cli(cluster, "tune", DEMO, "--space", str(space), f"run_dir={run_dir}",
                    *TINY_RAY, "train.backend=local", "train.epochs=2", "train.step_delay_s=0.2",
                    "train.eval_every=16",
                    "tune.trial_cpus=1", "tune.max_concurrent_trials=3", "tune.scheduler=none",
                    "tune.latency_repeats=2",
                    f"ray.address={cluster.address}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    rows = (run_dir / "tune" / "results.csv").read_text().splitlines()[1:]
    assert len(rows) == 3
    assert watch.most == MAX_NODES
    cluster.wait_for_workers(0, timeout_s=IDLE_TIMEOUT_S + 60)


# The elastic run: 1 to 2 workers, 4 epochs of the tiny KG (124 steps, each made 0.25 s
# longer by the test hook so that the run outlasts the drain's deadline and two restarts),
# a checkpoint every 10 steps, Ray Train looking for more workers every 5 s.
CHECKPOINT_EVERY = 10
# A checkpoint a worker has written becomes the run's when the Train controller registers
# it, at its next poll of the workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 0.5 s in tests):
# a node killed in between loses it (measured once under load: the step-100 checkpoint was
# on storage but unregistered when the node died at step 101, so the run resumed from step
# 90 and redid 11 steps). Each step takes at least step_delay_s = 0.25 s, so at most 2 steps
# fall in one poll interval; 1 more for a controller that polls late on a loaded machine.
IN_FLIGHT_STEPS = 3
ELASTIC = ["train.num_workers=[1, 2]", "train.epochs=4", "train.step_delay_s=0.25",
           f"train.eval_every={CHECKPOINT_EVERY}",
           "train.resize_interval_s=5", "train.max_failures=3", "model.entity_repr=table"]


def test_elastic_training_survives_a_preempted_and_a_killed_node(cluster, tmp_path):
    """An elastic run (1 to 2 workers): at step 8 a node is drained as preempted with a 10 s
    deadline and reclaimed then; 6 steps into the next attempt another node dies outright.
    The run finishes on what is left and what the autoscaler adds: no step redone after the
    preemption (the just-in-time checkpoint, then no more steps), at most one checkpoint
    interval (and the steps of a checkpoint not yet registered) redone after the kill, every
    step of the planned run taken (the data position is the global batch's), and the figures
    of one uninterrupted process."""
    cfg, overrides = _config(tmp_path / "elastic", *ELASTIC)
    run = run_with_faults(cluster, ["run", DEMO, f"run_dir={cfg.run_dir}", *overrides,
                                    f"ray.address={cluster.address}"], Path(cfg.run_dir),
                          deadline_s=10.0)
    assert run["returncode"] == 0, run["log"][-6000:]
    summary = json.loads((Path(cfg.run_dir) / "train" / "summary.json").read_text())
    attempts, redone = run["attempts"], run["redone"]
    preemption = summary["preemptions"][0]
    assert preemption["nodes"] == [run["drained_node"]]
    assert "being preempted: checkpoint at step" in run["log"]
    # The attempt after the reclaim starts where the just-in-time checkpoint was written,
    # which is the last step the preempted attempt took; the other restarts (the kill; a
    # resize when a second node joined after the start) redo at most one checkpoint interval
    # and the steps of a checkpoint written but not yet registered.
    restarts = fault_restarts(run, preemption["step"])
    most = CHECKPOINT_EVERY + IN_FLIGHT_STEPS
    assert restarts["drain"] == 0 and restarts["kill"] <= most, (restarts, redone)
    assert all(r <= most for r in redone), redone
    assert summary["steps"] == attempts[-1]["steps"][-1] == len(summary["losses"])
    taken = sorted({n for a in attempts for n in a["steps"]})
    assert taken == list(range(1, summary["steps"] + 1))  # every step, none skipped
    assert len(summary["resumes"]) == len(attempts) - 1 >= 2
    _matches_one_process(cfg, overrides, tmp_path)
    cluster.wait_for_workers(0, timeout_s=IDLE_TIMEOUT_S + 60)  # released once idle



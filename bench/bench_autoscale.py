"""Elastic training on Ray's autoscaler, on this machine: a local autoscaling cluster
(tests/autoscaling.py: Ray's fake multi-node provider, a head with no CPUs, worker nodes of
1 CPU launched on demand, released after an idle timeout) runs the tiny elastic training run
(`train.num_workers=[1, 2]`) twice: once uninterrupted, once with a node drained as preempted
(reclaimed at its deadline) and a node killed outright.

    python bench/bench_autoscale.py [--deadline 10] [--idle-timeout 8]

Figures (seconds are wall-clock on this 2-core machine, every node on it):
- cold_start_to_first_step_s: from `elmm-ray run` on a cluster with no worker nodes to the
  first optimizer step, split into the driver's stages before training, the nodes' launch,
  and the workers' start-up (processes, imports, model, DeepSpeed) up to the first step;
- node_loss_to_resumed_step_s: from a node killed without notice to the next step taken;
- steps_redone_drain / steps_redone_kill: steps taken again after each fault;
- scale_down_s: from the end of the run to no worker node;
- test_mrr_uninterrupted / test_mrr_after_faults: the test MRR of both runs.
Saves bench/results/autoscale.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import save  # noqa: E402

from elmm_ray.tables import format_table  # noqa: E402
from tests.autoscaling import (  # noqa: E402
    LocalAutoscalingCluster,
    fault_restarts,
    run_with_faults,
)
from tests.test_autoscaling import DEMO, ELASTIC, TINY_RAY  # noqa: E402

COMMAND = "python bench/bench_autoscale.py"


def _test_mrr(run_dir: Path) -> float:
    return json.loads((run_dir / "eval" / "metrics_test.json").read_text())["overall"]["mrr"]


def _stage_seconds(log: str) -> dict:
    """The driver's `[stage] done in N s` lines."""
    out = {}
    for line in log.splitlines():
        if line.startswith("[") and "] done in " in line:
            stage = line[1:line.index("]")]
            out[stage] = float(line.split("done in ")[1].split(" s")[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deadline", type=float, default=10.0,
                        help="seconds between the drain notice and the node's reclaim")
    parser.add_argument("--idle-timeout", type=float, default=8.0)
    args = parser.parse_args()
    cluster = LocalAutoscalingCluster({"cpu_worker": {"resources": {"CPU": 1}}},
                                      max_workers=3, idle_timeout_s=args.idle_timeout)
    t0 = time.perf_counter()
    cluster.start()
    head_start = time.perf_counter() - t0
    results: dict = {"command": COMMAND, "head_start_s": head_start,
                     "idle_timeout_s": args.idle_timeout, "drain_deadline_s": args.deadline,
                     "overrides": [*TINY_RAY, *ELASTIC]}
    try:
        with tempfile.TemporaryDirectory(prefix="bench_autoscale_") as tmp:
            runs = {}
            for name, faults in (("uninterrupted", False), ("faults", True)):
                run_dir = Path(tmp) / name
                # Stages before training on the cluster too (pack, extract, entity init):
                # they launch the nodes; the cold start is measured from the command.
                cluster.wait_for_workers(0, timeout_s=args.idle_timeout + 90)
                run = run_with_faults(
                    cluster, ["run", DEMO, f"run_dir={run_dir}", *TINY_RAY, *ELASTIC,
                              f"ray.address={cluster.address}"], run_dir,
                    drain_at_step=8 if faults else None, deadline_s=args.deadline,
                    kill_after_steps=6 if faults else None)
                if run["returncode"] != 0:
                    raise RuntimeError(f"{name} run failed:\n{run['log'][-4000:]}")
                down_start = time.perf_counter()
                scale_down = cluster.wait_for_workers(0, timeout_s=args.idle_timeout + 120)
                run["scale_down_s"] = scale_down + (time.perf_counter() - down_start
                                                    - scale_down)
                run["test_mrr"] = _test_mrr(run_dir)
                run["stages_s"] = _stage_seconds(run["log"])
                summary = json.loads((run_dir / "train" / "summary.json").read_text())
                run["resumes"], run["preemptions"] = summary["resumes"], summary["preemptions"]
                run["steps"] = summary["steps"]
                runs[name] = run
        clean, faulted = runs["uninterrupted"], runs["faults"]
        first_attempt = clean["attempts"][0]
        loop_start = first_attempt["at"] - clean["started"]
        ev = faulted["events"]
        restarts = fault_restarts(faulted, faulted["preemptions"][0]["step"])
        stages = clean["stages_s"]
        results.update({
            "cold_start_to_first_step_s": clean["events"]["first_step"],
            # Where the cold start goes (seconds from `elmm-ray run`): the first worker node
            # up (the autoscaler's launch and its raylet), the stages before training on the
            # nodes (pack, extract, entity init: Ray Data), the Ray Train workers' start-up
            # (processes, imports, model build, DeepSpeed) to the loop, and the first step.
            "cold_start_profile_s": {
                "first_worker_node_up": clean["events"].get("node_1_up"),
                "second_worker_node_up": clean["events"].get("node_2_up"),
                "stages_before_train": {k: stages[k] for k in ("synth", "pack", "extract",
                                                               "entity_init") if k in stages},
                "train_loop_started": loop_start,
                "first_step": clean["events"]["first_step"],
            },
            "node_loss_to_resumed_step_s": ev["resumed_after_kill"] - ev["kill"],
            "reclaim_to_resumed_step_s": ev["resumed_after_reclaim"] - ev["reclaim"],
            "steps_redone_drain": restarts["drain"],
            "steps_redone_kill": restarts["kill"],
            "steps_redone_every_restart": faulted["redone"],
            "restarts_that_grew_the_run": restarts["grew"],
            "attempts_faults": [{k: a[k] for k in ("workers", "from")} | {
                "steps": len(a["steps"])} for a in faulted["attempts"]],
            "scale_down_s": clean["scale_down_s"],
            "test_mrr_uninterrupted": clean["test_mrr"],
            "test_mrr_after_faults": faulted["test_mrr"],
            "steps": clean["steps"],
            "run_seconds": {"uninterrupted": clean["events"]["end"],
                            "faults": faulted["events"]["end"]},
            "stages_s": {"uninterrupted": clean["stages_s"], "faults": faulted["stages_s"]},
            "events_faults_s": ev,
        })
    finally:
        cluster.stop()
    rows = [[k, f"{v:.3f}" if isinstance(v, float) else str(v)] for k, v in results.items()
            if k in ("cold_start_to_first_step_s", "node_loss_to_resumed_step_s",
                     "reclaim_to_resumed_step_s", "steps_redone_drain", "steps_redone_kill",
                     "scale_down_s", "test_mrr_uninterrupted", "test_mrr_after_faults")]
    print(format_table(rows, ["figure", "value"]))
    save("autoscale", results)


if __name__ == "__main__":
    main()

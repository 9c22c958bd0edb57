"""A local autoscaling Ray cluster for tests and benchmarks: Ray's own autoscaler (the one
that drives AWS, GCP and KubeRay) with Ray's fake multi-node provider, which launches local
raylets instead of VMs.

Two traps of Ray 2.60 are avoided: ``ray.cluster_utils.AutoscalingCluster`` fails as shipped
(its ``example.yaml`` is not in the wheel) and its ``start()`` runs ``ray stop --force``, which
ends every Ray process of the machine. Here the head is started by hand (``ray start --head
--autoscaling-config``) with a temp dir of its own, and :meth:`LocalAutoscalingCluster.stop`
ends exactly the processes whose command line names that dir (the head's, the worker nodes'
and their workers'). Everything binds 127.0.0.1; the provider below starts the worker nodes
there too (Ray's would pick the machine's address). Token authentication is on, as on a real
cluster, with the token under the cluster's own HOME.

The provider is loaded by the autoscaler as ``type: external`` with
``module: tests.autoscaling.LoopbackFakeProvider``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"


class LoopbackFakeProvider(FakeMultiNodeProvider):
    """Ray's fake multi-node provider with every node on 127.0.0.1 and a temp dir of its own
    beside the head's (``RAY_TMPDIR``), in the cluster's root. A node type's ``resources``
    may name GPUs: its raylet advertises them (logical GPUs: the scheduler's path, no
    device)."""

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources,
                                               labels):
        import ray
        from ray._private import ray_constants
        from ray.autoscaler.tags import (
            NODE_KIND_WORKER,
            STATUS_UP_TO_DATE,
            TAG_RAY_NODE_KIND,
            TAG_RAY_NODE_NAME,
            TAG_RAY_NODE_STATUS,
            TAG_RAY_USER_NODE_TYPE,
        )

        resources = copy.deepcopy(resources)
        with self.lock:
            node_type = tags[TAG_RAY_USER_NODE_TYPE]
            next_id = self._next_hex_node_id()
            # A temp dir per node, as every machine of a real cluster has its own disk: the
            # working_dir packages of `ray job submit` are unpacked by each node's runtime-env
            # agent into its own session dir, never into a directory another node's agent
            # and workers use at the same time. A short name: Ray's sockets live under it.
            self._launched = getattr(self, "_launched", 0) + 1
            temp_dir = Path(os.environ["RAY_TMPDIR"]).parent / f"n{self._launched}"
            params = ray._private.parameter.RayParams(
                node_ip_address=LOOPBACK, min_worker_port=0, max_worker_port=0,
                dashboard_port=None, dashboard_agent_listen_port=0,
                temp_dir=str(temp_dir),
                num_cpus=resources.pop("CPU", 0), num_gpus=resources.pop("GPU", 0),
                object_store_memory=resources.pop("object_store_memory", None),
                resources=resources, labels=labels,
                redis_address=self._gcs_address, gcs_address=self._gcs_address,
                env_vars={
                    "RAY_OVERRIDE_NODE_ID_FOR_TESTING": next_id,
                    "RAY_CLOUD_INSTANCE_ID": next_id,
                    "RAY_NODE_TYPE_NAME": node_type,
                    ray_constants.RESOURCES_ENVIRONMENT_VARIABLE: json.dumps(resources),
                    ray_constants.LABELS_ENVIRONMENT_VARIABLE: json.dumps(labels),
                })
            node = ray._private.node.Node(params, head=False, shutdown_at_exit=False,
                                          spawn_reaper=False)
            all_tags = {TAG_RAY_NODE_KIND: NODE_KIND_WORKER, TAG_RAY_USER_NODE_TYPE: node_type,
                        TAG_RAY_NODE_NAME: next_id, TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE}
            all_tags.update(tags)
            self._nodes[next_id] = {"tags": all_tags, "node": node}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class LocalAutoscalingCluster:
    """A head with no CPUs (every task, actor and training worker needs a worker node) and
    worker node types that the autoscaler launches on demand and releases after
    ``idle_timeout_s``. ``env()`` is the environment of a client (a driver, ``ray job
    submit``, a probe) of this cluster."""

    def __init__(self, worker_types: dict[str, dict], *, max_workers: int = 3,
                 idle_timeout_s: float = 10.0, upscaling_speed: float = 100.0,
                 root: str | None = None) -> None:
        # A short path: Ray's unix sockets live under it (~107 characters at most).
        self._own_root = root is None  # removed by stop()
        self.root = Path(root or tempfile.mkdtemp(prefix="elmm-as-", dir="/tmp"))
        self.worker_types, self.max_workers = worker_types, max_workers
        # Nodes launched per round, as a multiple of those up: high, so that what a test
        # asks for arrives in one round (Ray's default, 1.0, doubles the cluster per round).
        self.idle_timeout_s, self.upscaling_speed = idle_timeout_s, upscaling_speed
        self.port = _free_port()
        self.dashboard_port = _free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        self.home = self.root / "home"

    def env(self, **extra: str) -> dict[str, str]:
        """A client's environment: the cluster's address, HOME (its token) and temp dir."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
        env.update(HOME=str(self.home), RAY_TMPDIR=str(self.root / "ray"),
                   RAY_AUTH_MODE="token", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                   PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
                   HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
        return env

    @property
    def token_file(self) -> Path:
        return self.home / ".ray" / "auth_token"

    def start(self, timeout_s: float = 90.0) -> LocalAutoscalingCluster:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.root / "ray").mkdir(exist_ok=True)
        # The cluster's token, made as Ray's `get-auth-token --generate` makes one and with
        # the mode Ray gives it under umask 022 (0644: readable by every user), so that a
        # test sees the project's client make it private (ray_session.secure_token_file).
        self.token_file.parent.mkdir(exist_ok=True)
        self.token_file.write_text(secrets.token_hex(32))
        self.token_file.chmod(0o644)
        config = {
            "cluster_name": "elmm-local-autoscaling",
            "max_workers": self.max_workers,
            "idle_timeout_minutes": self.idle_timeout_s / 60,
            "upscaling_speed": self.upscaling_speed,
            "provider": {"type": "external", "module": f"{__name__}.LoopbackFakeProvider",
                         "gcs_address": self.address, "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True},
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": 0}, "node_config": {},
                                     "max_workers": 0},
                **{name: {"resources": spec["resources"], "node_config": {},
                          "min_workers": spec.get("min_workers", 0),
                          "max_workers": spec.get("max_workers", self.max_workers)}
                   for name, spec in self.worker_types.items()}},
            "head_node_type": "ray.head.default",
            "auth": {"ssh_user": "nobody"},
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
            "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
            "head_start_ray_commands": [], "worker_start_ray_commands": [],
        }
        path = self.root / "autoscaling.yaml"
        path.write_text(yaml.safe_dump(config))
        env = self.env(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        ray_bin = Path(sys.executable).with_name("ray")
        done = subprocess.run(
            [str(ray_bin), "start", "--head", f"--port={self.port}", "--num-cpus=0",
             f"--node-ip-address={LOOPBACK}", f"--temp-dir={self.root / 'ray'}",
             f"--autoscaling-config={path}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dashboard_port}", "--disable-usage-stats"],
            env=env, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start --head failed:\n{done.stdout}\n{done.stderr}")
        return self

    def probe(self, code: str, timeout_s: float = 60.0) -> object:
        """Run ``code`` (it sets ``result``) in a client of the cluster; returns ``result``."""
        script = (f"import json, ray\nray.init(address={self.address!r}, "
                  f"logging_level='ERROR')\n{code}\nprint('RESULT ' + json.dumps(result))\n")
        done = subprocess.run([sys.executable, "-c", script], env=self.env(),
                              capture_output=True, text=True, timeout=timeout_s)
        for line in done.stdout.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        raise RuntimeError(f"probe failed ({done.returncode}):\n{done.stderr[-3000:]}")

    def worker_nodes(self) -> list[dict]:
        """The alive worker nodes: id, resources, raylet socket."""
        return self.probe(
            "result = [{'id': n['NodeID'], 'resources': n['Resources'], 'socket': "
            "n['RayletSocketName']} for n in ray.nodes() if n['Alive'] and "
            "n['Resources'].get('CPU', 0) > 0]")

    def wait_for_workers(self, count: int, timeout_s: float, at_least: bool = False) -> float:
        """Seconds until the cluster has ``count`` worker nodes (``at_least``: or more)."""
        start = time.perf_counter()
        while True:
            n = len(self.worker_nodes())
            if n == count or (at_least and n >= count):
                return time.perf_counter() - start
            if time.perf_counter() - start > timeout_s:
                raise TimeoutError(f"{n} worker node(s) after {timeout_s} s, expected {count}")
            time.sleep(1.0)

    def training_nodes(self) -> list[str]:
        """The nodes that host a live Ray Train worker (Ray's state API, at this cluster's
        address: another Ray instance on the machine must not be asked)."""
        return self.probe(
            "from ray.util.state import list_actors\n"
            f"result = sorted({{a.node_id for a in list_actors(address={self.address!r}, "
            "filters=[('state', '=', 'ALIVE')], limit=10000) "
            "if 'RayTrainWorker' in (a.class_name or '')})")

    def raylet_pid(self, node: dict) -> int | None:
        """The pid of a node's raylet (its socket name is on its command line); ``None`` when
        the node is gone already."""
        import psutil

        for proc in psutil.process_iter(["pid", "cmdline"]):
            args = proc.info["cmdline"] or []
            if "raylet" in (args[0] if args else "") and any(
                    a == node["socket"] or a.endswith("=" + node["socket"]) for a in args):
                return proc.info["pid"]
        return None

    def kill_node(self, node: dict) -> bool:
        """SIGKILL a node's raylet (a machine lost without notice); False: it was gone."""
        pid = self.raylet_pid(node)
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        return True

    def own_processes(self) -> list:
        """Every process of this cluster: its command line (or RAY_TMPDIR) names the cluster's
        temp dir, or it descends from one that does."""
        import psutil

        mine, marker = [], str(self.root)
        for proc in psutil.process_iter(["pid", "cmdline", "environ"]):
            with contextlib.suppress(psutil.Error):
                cmdline = " ".join(proc.info["cmdline"] or [])
                environ = proc.info["environ"] or {}
                if (marker in cmdline or environ.get("RAY_TMPDIR", "").startswith(marker)) \
                        and proc.pid != os.getpid():
                    mine.append(proc)
        # With their children: the head's dashboard agent names neither the cluster's temp dir
        # in its (retitled) command line nor RAY_TMPDIR; left alive, it keeps its port (52365)
        # and the next head on this machine starts without a job agent.
        for proc in list(mine):
            with contextlib.suppress(psutil.Error):
                mine.extend(c for c in proc.children(recursive=True) if c not in mine)
        return mine

    def stop(self) -> None:
        """End this cluster's processes only (never ``ray stop``)."""
        import psutil

        procs = self.own_processes()
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=10)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)


# --- a training run with a preempted and a killed node ---------------------------------------


def read_ledger(run_dir: Path) -> list[dict]:
    """The attempts of a training run from its step ledger (``<run_dir>/train/steps.log``):
    each ``{"workers", "from", "at", "steps": [...]}``."""
    path = Path(run_dir) / "train" / "steps.log"
    attempts: list[dict] = []
    if not path.is_file():
        return attempts
    for line in path.read_text().splitlines():
        if line.startswith("# attempt"):
            fields = dict(part.split("=", 1) for part in line[len("# attempt "):].split())
            attempts.append({"workers": int(fields["workers"]), "from": int(fields["from"]),
                             "at": float(fields["at"]), "steps": []})
        elif line.strip() and attempts:
            attempts[-1]["steps"].append(int(line))
    return attempts


def steps_redone(attempts: list[dict]) -> list[int]:
    """Per restart, the steps the next attempt took again (the last step an attempt reached
    minus the step the next one resumed from)."""
    return [max(0, (a["steps"][-1] if a["steps"] else a["from"]) - b["from"])
            for a, b in zip(attempts, attempts[1:], strict=False)]


def fault_restarts(run: dict, preempted_at: int) -> dict:
    """Which restart of a :func:`run_with_faults` run followed the preemption (the attempt
    that starts at the just-in-time checkpoint's step ``preempted_at``) and which the kill
    (the first attempt started after it), with the steps each redid."""
    attempts, redone = run["attempts"], steps_redone(run["attempts"])
    drain = next(i for i, a in enumerate(attempts) if i and a["from"] == preempted_at)
    kill_at = run["started"] + run["events"]["kill"]
    kill = next(i for i, a in enumerate(attempts) if a["at"] > kill_at)
    return {"drain": redone[drain - 1], "kill": redone[kill - 1],
            "grew": [i for i in range(1, len(attempts))
                     if attempts[i]["workers"] > attempts[i - 1]["workers"]]}


def _wait(predicate, timeout_s: float, proc: subprocess.Popen, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended (rc {proc.returncode}) before {what}")
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"no {what} within {timeout_s} s")


def run_with_faults(cluster: LocalAutoscalingCluster, args: list[str], run_dir: Path, *,
                    drain_at_step: int | None = 8, deadline_s: float = 10.0,
                    kill_after_steps: int | None = 6, timeout_s: float = 900.0) -> dict:
    """Run ``elmm-ray ARGS`` (a training run into ``run_dir``) on ``cluster``; at step
    ``drain_at_step`` (with two worker nodes up) drain one node as preempted with a deadline
    of ``deadline_s`` and kill its raylet then (the cloud reclaiming it); ``kill_after_steps``
    steps into the next attempt, kill another node's raylet without notice. ``None`` skips a
    fault. Returns the timings (seconds from the start), the ledger's attempts, the nodes
    hit, the return code and the console output."""
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "elmm_ray.cli", *args], env=cluster.env(),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
    out: dict = {"events": {}, "started": started}
    events = out["events"]
    watching = threading.Event()

    def watch_nodes() -> None:  # when the first and the second worker node came up
        while not watching.is_set():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                n = len(cluster.worker_nodes())
                for count in (1, 2):
                    if n >= count:
                        events.setdefault(f"node_{count}_up", time.time() - started)
            if "node_2_up" in events:
                return
            watching.wait(0.5)

    watcher = threading.Thread(target=watch_nodes, daemon=True)
    watcher.start()

    def steps() -> int:
        return sum(len(a["steps"]) for a in read_ledger(run_dir))

    try:
        events["first_step"] = _wait(lambda: steps() >= 1 and time.time(), timeout_s, proc,
                                     "a first step") - started
        if drain_at_step is not None:
            # Two workers training: the ledger's last attempt has two and has taken a step
            # (an elastic run may start on one node and grow when the second comes up).
            def two_workers_stepping() -> bool:
                a = read_ledger(run_dir)
                return (sum(len(x["steps"]) for x in a) >= drain_at_step
                        and a[-1]["workers"] >= 2 and bool(a[-1]["steps"])
                        and len(cluster.training_nodes()) >= 2)

            _wait(two_workers_stepping, timeout_s, proc, f"step {drain_at_step} on two nodes")
            before = len(read_ledger(run_dir))
            hosts = cluster.training_nodes()
            drained = next(n for n in cluster.worker_nodes() if n["id"] in hosts)
            done = subprocess.run(
                [str(Path(sys.executable).with_name("ray")), "drain-node",
                 f"--address={cluster.address}", f"--node-id={drained['id']}",
                 "--reason=DRAIN_NODE_REASON_PREEMPTION",
                 "--reason-message=spot reclaim (test)",
                 f"--deadline-remaining-seconds={int(deadline_s)}"],
                env=cluster.env(), capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                raise RuntimeError(f"ray drain-node failed: {done.stderr[-2000:]}")
            events["drain"] = time.time() - started
            time.sleep(max(0.0, started + events["drain"] + deadline_s - time.time()))
            # The cloud reclaims it at the deadline (Ray may have ended it already).
            out["drained_node_was_up_at_deadline"] = cluster.kill_node(drained)
            events["reclaim"] = time.time() - started
            out["drained_node"] = drained["id"]
            # A step in an attempt that started after the drain (the attempt right after it
            # may have been preempted in turn before its first step, when it was a resize).
            _wait(lambda: any(a["steps"] for a in read_ledger(run_dir)[before:]), timeout_s,
                  proc, "a step after the preemption")
            events["resumed_after_reclaim"] = time.time() - started
        if kill_after_steps is not None:
            first = len(read_ledger(run_dir))
            _wait(lambda: len(a := read_ledger(run_dir)) >= first
                  and len(a[-1]["steps"]) >= kill_after_steps, timeout_s, proc,
                  f"{kill_after_steps} steps into the attempt")
            hosts = cluster.training_nodes()
            victim = next(n for n in cluster.worker_nodes()
                          if n["id"] in hosts and n["id"] != out.get("drained_node"))
            if not cluster.kill_node(victim):  # no notice
                raise RuntimeError(f"node {victim['id']} was gone before it could be killed")
            events["kill"] = time.time() - started
            out["killed_node"] = victim["id"]
            _wait(lambda: len(a := read_ledger(run_dir)) > first and a[-1]["steps"],
                  timeout_s, proc, "a step after the kill")
            events["resumed_after_kill"] = time.time() - started
        out["returncode"] = proc.wait(timeout=timeout_s)
        events["end"] = time.time() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)
        watching.set()
        watcher.join(timeout=60)
    out["log"] = "".join(log)
    out["attempts"] = read_ledger(run_dir)
    out["redone"] = steps_redone(out["attempts"])
    return out

"""The files of ``cluster/`` hold together: the launcher YAMLs pass the schema shipped in the
Ray wheel (and Ray's own prepare/validate), the KubeRay manifests have the structure KubeRay
reads, every file runs the one project image with token auth and the dashboard off the
wildcard address, the storage and Secret they name are defined, the runtime env works with
``ray_session.init_ray`` and the Dockerfile pins torch and runs as the Ray user. Autoscaling
and spot: an on-demand head, on-demand and Spot GPU worker groups, the Spot group the one
Ray's own autoscaler picks first, idle timeouts, KubeRay ``authOptions`` and health probes
that work under token auth.

Each check is a function over parsed files; ``test_check_catches`` breaks a copy of the real
files one defect at a time and expects the check to fail, so none of them can pass vacuously.
Fast: no network, no Ray cluster."""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from elmm_ray.ray_session import RAY_ENV_DEFAULTS

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHERS = ("aws-a100.yaml", "gcp-a100.yaml")
KUBERAY = CLUSTER / "kuberay"
SHARED = "/mnt/shared"  # the mount point every cluster file provides
PAPER_CONFIG = REPO / "configs" / "fb15k237_llava7b.yaml"
DRIVER_MIN_MEMORY_GI = 16  # the driver only orchestrates: the KG, gathered ranks, manifests
IMAGE_WORKDIR = "/home/ray/elmm-ray"  # where cluster/Dockerfile puts jobs/ and configs/
# Node labels of Spot capacity: GKE Spot VMs, EKS managed node groups.
SPOT_LABELS = {"cloud.google.com/gke-spot": "true", "eks.amazonaws.com/capacityType": "SPOT"}
HEALTH_PATH, AGENT_PORT = "/api/healthz", 52365  # Ray's dashboard-agent health check, public


class Defect(AssertionError):
    """A cluster file breaks a rule; the message names the file and the rule."""


def need(condition: object, message: str) -> None:
    if not condition:
        raise Defect(message)


# ---------------------------------------------------------------- loading


def load_launchers() -> dict[str, dict]:
    return {name: yaml.safe_load((CLUSTER / name).read_text()) for name in LAUNCHERS}


def load_kuberay() -> dict[str, list[dict]]:
    return {path.name: [d for d in yaml.safe_load_all(path.read_text()) if d]
            for path in sorted(KUBERAY.glob("*.yaml"))}


def cluster_texts() -> dict[str, str]:
    return {str(p.relative_to(REPO)): p.read_text() for p in sorted(CLUSTER.rglob("*"))
            if p.is_file()}


def ray_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def project_image() -> str:
    return load_launchers()[LAUNCHERS[0]]["docker"]["image"]


# ---------------------------------------------------------------- launcher checks


def check_launcher(name: str, cfg: dict, image: str) -> None:
    """One cluster-launcher YAML: schema, image, storage, auth, dashboard, autoscaling."""
    errors = sorted(jsonschema.Draft7Validator(ray_schema()).iter_errors(cfg), key=str)
    need(not errors, f"{name}: not valid against ray-schema.json: "
         + "; ".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:3]))
    docker = cfg.get("docker") or {}
    need(docker.get("image") == image, f"{name}: docker.image {docker.get('image')!r} is not the "
         f"project image {image!r}")
    run_options = " ".join(docker.get("run_options", []))
    need(f"-v {SHARED}:{SHARED}" in run_options,
         f"{name}: the container does not bind-mount {SHARED}")
    need("RAY_AUTH_MODE=token" in run_options, f"{name}: token auth is not on in the container")
    need(any(SHARED in c and "mount " in c for c in cfg.get("initialization_commands", [])),
         f"{name}: no initialization command mounts the shared file system at {SHARED}")
    need(any(".ray/auth_token" in k for k in (cfg.get("file_mounts") or {})),
         f"{name}: the auth token is not copied to the nodes (file_mounts)")
    head_start = " ".join(cfg.get("head_start_ray_commands", []))
    need(re.search(r"--dashboard-host[= ](127\.0\.0\.1|localhost)\b", head_start),
         f"{name}: the head's dashboard is not bound to 127.0.0.1")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    need(head.get("resources", {}).get("CPU") == 0, f"{name}: the head must advertise CPU: 0")
    gpu_types = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) > 0]
    need(gpu_types, f"{name}: no GPU worker type")
    for worker in gpu_types:
        need(worker.get("min_workers", 0) < worker.get("max_workers", 0),
             f"{name}: GPU workers do not autoscale (min_workers >= max_workers)")
    for key, node in types.items():
        image_id = str(node["node_config"].get("ImageId", ""))
        disks = node["node_config"].get("disks", [])
        sources = [d.get("initializeParams", {}).get("sourceImage", "") for d in disks]
        for source in [image_id, *sources]:
            need("latest_dlami" not in source and "18.04" not in source,
                 f"{name}: node type {key} boots an outdated image {source!r}")
        need(image_id or any(sources), f"{name}: node type {key} names no machine image")


def _is_spot(provider: str, node_config: dict) -> bool:
    if provider == "aws":
        return (node_config.get("InstanceMarketOptions") or {}).get("MarketType") == "spot"
    scheduling = node_config.get("scheduling") or {}
    entries = scheduling if isinstance(scheduling, list) else [scheduling]
    return any(e.get("provisioningModel") == "SPOT" or e.get("preemptible") for e in entries)


def first_gpu_node_type(node_types: dict, head_type: str) -> str:
    """The node type Ray's autoscaler (v1, the default in 2.60) launches first for one GPU
    node's worth of 1-GPU bundles (8 Ray Train workers), from Ray's own scheduler."""
    from ray.autoscaler._private.node_provider_availability_tracker import (
        NodeAvailabilitySummary,
    )
    from ray.autoscaler._private.resource_demand_scheduler import (
        _default_utilization_scorer,
        get_nodes_for,
    )

    scorer = functools.partial(_default_utilization_scorer,
                               node_availability_summary=NodeAvailabilitySummary({}))
    gpus = max(int(t.get("resources", {}).get("GPU", 0)) for t in node_types.values())
    to_add, left = get_nodes_for(node_types, {}, head_type, 1, [{"GPU": 1}] * gpus, scorer)
    need(to_add and not left, f"Ray's scheduler places no GPU node: {dict(to_add)}, {left}")
    return next(iter(to_add))


def check_launcher_spot(name: str, cfg: dict) -> None:
    """On-demand head, on-demand and Spot GPU worker types, Spot first, idle timeout."""
    provider = cfg["provider"]["type"]
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    need(not _is_spot(provider, head["node_config"]), f"{name}: the head is a Spot node")
    gpu = {k: t for k, t in types.items() if t.get("resources", {}).get("GPU", 0) > 0}
    spot = {k for k, t in gpu.items() if _is_spot(provider, t["node_config"])}
    need(spot, f"{name}: no Spot/preemptible GPU worker type")
    need(set(gpu) - spot, f"{name}: no on-demand GPU worker type beside the Spot one")
    for key in spot:
        node_config = types[key]["node_config"]
        if provider == "aws":
            options = node_config["InstanceMarketOptions"].get("SpotOptions", {})
            need(options.get("SpotInstanceType") == "one-time"
                 and options.get("InstanceInterruptionBehavior") == "terminate",
                 f"{name}: {key} must be a one-time Spot request that terminates on "
                 "interruption (Ray's AWS provider cannot stop Spot instances)")
        else:
            entries = node_config["scheduling"]
            entry = entries[0] if isinstance(entries, list) else entries
            need(entry.get("provisioningModel") == "SPOT" and not entry.get("preemptible"),
                 f"{name}: {key} uses the legacy preemptible model (24-hour limit)")
            need(entry.get("instanceTerminationAction") == "DELETE",
                 f"{name}: {key}: a preempted Spot VM must be deleted (STOP keeps a billed VM "
                 "Ray never reuses)")
            need(entry.get("onHostMaintenance") == "TERMINATE"
                 and entry.get("automaticRestart") is False,
                 f"{name}: {key}: Spot GPU VMs need onHostMaintenance TERMINATE and "
                 "automaticRestart false")
    timeout = cfg.get("idle_timeout_minutes")
    need(isinstance(timeout, (int, float)) and timeout > 0,
         f"{name}: idle_timeout_minutes is not set")
    first = first_gpu_node_type(types, cfg["head_node_type"])
    need(first in spot, f"{name}: Ray's autoscaler launches {first} first, not the Spot type")


def check_ray_prepare(name: str, cfg: dict) -> None:
    """Ray's own config preparation and validation (what `ray up` runs first), offline."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(cfg)))
    except Exception as err:  # Ray raises ValueError / RuntimeError / jsonschema errors
        raise Defect(f"{name}: Ray's prepare_config/validate_config refuse it: {err}") from err


def check_paper_config_on_shared() -> None:
    """The paper-scale config keeps everything on the shared mount the cluster files provide."""
    cfg = yaml.safe_load(PAPER_CONFIG.read_text())
    paths = {"run_dir": cfg["run_dir"], "dataset.path": cfg["dataset"]["path"],
             "images.feature_store": cfg["images"]["feature_store"]}
    for key, value in paths.items():
        need(str(value).startswith(SHARED + "/"),
             f"{PAPER_CONFIG.name}: {key}={value} is not under {SHARED}")


# ---------------------------------------------------------------- KubeRay checks


def _walk(node: object):
    """Every dict inside ``node`` (depth first)."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _has_token_env(env: list[dict], secret: str) -> bool:
    by_name = {e.get("name"): e for e in env or []}
    mode = by_name.get("RAY_AUTH_MODE", {}).get("value")
    ref = by_name.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
    return mode == "token" and ref.get("name") == secret


def _memory_gi(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Gi|Mi|Ti)", str(value))
    need(match, f"memory {value!r} is not in Mi/Gi/Ti")
    return float(match[1]) * {"Mi": 1 / 1024, "Gi": 1, "Ti": 1024}[match[2]]


def check_ray_cluster_spec(where: str, spec: dict, image: str, secret: str) -> None:
    """A RayCluster spec (RayCluster.spec or RayJob.spec.rayClusterSpec)."""
    need(spec.get("rayVersion") == ray.__version__,
         f"{where}: rayVersion {spec.get('rayVersion')!r} is not Ray {ray.__version__}")
    need(spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling is off")
    need(_has_token_env(spec.get("autoscalerOptions", {}).get("env"), secret),
         f"{where}: the autoscaler has no token env")
    head = spec["headGroupSpec"]
    params = head.get("rayStartParams", {})
    need(params.get("num-cpus") == "0", f"{where}: the head must start with num-cpus 0")
    need("dashboard-host" in params, f"{where}: dashboard-host unset (KubeRay's default is "
         "every interface)")
    head_containers = head["template"]["spec"]["containers"]
    head_memory = head_containers[0].get("resources", {}).get("limits", {}).get("memory", "0Mi")
    need(_memory_gi(head_memory) >= DRIVER_MIN_MEMORY_GI,
         f"{where}: the head (where the driver runs) has {head_memory}, under "
         f"{DRIVER_MIN_MEMORY_GI}Gi")
    groups = spec.get("workerGroupSpecs", [])
    gpu_groups = [g for g in groups
                  if any(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
                         for c in g["template"]["spec"]["containers"])]
    need(gpu_groups, f"{where}: no worker group requests nvidia.com/gpu")
    for group in gpu_groups:
        need(group.get("minReplicas", 0) < group.get("maxReplicas", 0),
             f"{where}: worker group {group['groupName']} cannot scale (min >= max)")
    templates = [head["template"], *(g["template"] for g in groups)]
    for template in templates:
        for container in template["spec"]["containers"]:
            cname = container["name"]
            need(container.get("image") == image,
                 f"{where}: container {cname} runs {container.get('image')!r}, not {image!r}")
            resources = container.get("resources", {})
            need(resources.get("limits", {}).get("cpu") and resources.get("limits", {}).get(
                "memory"), f"{where}: container {cname} has no cpu/memory limits")
            requests = resources.get("requests", {})
            for key, value in resources.get("limits", {}).items():
                need(requests.get(key, value) == value,
                     f"{where}: container {cname} requests {key}={requests.get(key)} but its "
                     f"limit is {value}")
            need(_has_token_env(container.get("env"), secret),
                 f"{where}: container {cname} lacks RAY_AUTH_MODE=token / RAY_AUTH_TOKEN")
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            need(SHARED in mounts, f"{where}: container {cname} does not mount {SHARED}")
    check_kuberay_spot(where, spec, secret)


def _spot_selected(pod_spec: dict) -> bool:
    selector = pod_spec.get("nodeSelector") or {}
    return any(selector.get(k) == v for k, v in SPOT_LABELS.items())


def _tolerates_spot(pod_spec: dict) -> bool:
    return any(t.get("key") in SPOT_LABELS for t in pod_spec.get("tolerations") or [])


def _avoids_spot(pod_spec: dict) -> bool:
    """Required node affinity that keeps the pod off Spot nodes."""
    required = (((pod_spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    terms = required.get("nodeSelectorTerms") or []
    return bool(terms) and all(
        any(e.get("key") in SPOT_LABELS and e.get("operator") in ("DoesNotExist", "NotIn")
            for e in term.get("matchExpressions") or []) for term in terms)


def _check_probes(where: str, container: dict) -> None:
    for kind in ("livenessProbe", "readinessProbe"):
        get = (container.get(kind) or {}).get("httpGet") or {}
        need(get.get("path") == HEALTH_PATH and get.get("port") == AGENT_PORT,
             f"{where}: container {container['name']} {kind} is not GET {HEALTH_PATH} on "
             f"{AGENT_PORT} (KubeRay's older default wgets localhost:8265, where the dashboard "
             "does not listen)")


def check_kuberay_spot(where: str, spec: dict, secret: str) -> None:
    """authOptions with our Secret, an idle timeout, an on-demand head, on-demand and Spot GPU
    groups (Spot: nodeSelector + toleration), the Spot group first, probes that need no token."""
    auth = spec.get("authOptions") or {}
    need(auth.get("mode") == "token", f"{where}: authOptions.mode is not token")
    need(auth.get("secretName") == secret,
         f"{where}: authOptions.secretName {auth.get('secretName')!r} is not the Secret {secret}")
    idle = (spec.get("autoscalerOptions") or {}).get("idleTimeoutSeconds")
    need(isinstance(idle, int) and idle > 0, f"{where}: autoscalerOptions.idleTimeoutSeconds unset")
    head_pod = spec["headGroupSpec"]["template"]["spec"]
    need(not _spot_selected(head_pod) and not _tolerates_spot(head_pod) and _avoids_spot(head_pod),
         f"{where}: the head may land on a Spot node (it needs an affinity that excludes Spot)")
    gpu_groups = [g for g in spec.get("workerGroupSpecs", [])
                  if any(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
                         for c in g["template"]["spec"]["containers"])]
    spot = [g for g in gpu_groups if _spot_selected(g["template"]["spec"])]
    need(spot, f"{where}: no GPU worker group selects Spot nodes (nodeSelector)")
    for group in spot:
        need(_tolerates_spot(group["template"]["spec"]),
             f"{where}: Spot group {group['groupName']} does not tolerate the Spot taint")
    on_demand = [g for g in gpu_groups if g not in spot]
    need(on_demand, f"{where}: no on-demand GPU worker group beside the Spot one")
    for group in on_demand:
        need(_avoids_spot(group["template"]["spec"]),
             f"{where}: on-demand group {group['groupName']} may land on Spot nodes")
    for template in [spec["headGroupSpec"]["template"],
                     *(g["template"] for g in spec.get("workerGroupSpecs", []))]:
        _check_probes(where, template["spec"]["containers"][0])
    # What Ray's KubeRay autoscaler makes of this spec, and the group it scales up first.
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    try:
        derived = _derive_autoscaling_config_from_ray_cr(
            {"metadata": {"name": "elmm-ray", "namespace": "default"}, "spec": spec})
    except Exception as err:
        raise Defect(f"{where}: Ray's KubeRay autoscaler cannot read the spec: {err}") from err
    need(derived["idle_timeout_minutes"] == idle / 60, f"{where}: idle timeout not read")
    first = first_gpu_node_type(derived["available_node_types"], derived["head_node_type"])
    need(first in {g["groupName"] for g in spot},
         f"{where}: Ray's autoscaler scales {first} up first, not the Spot group")


def check_kuberay(docs_by_file: dict[str, list[dict]], image: str) -> None:
    """Every manifest: kinds and required fields; references resolve inside cluster/kuberay."""
    defined: dict[str, set[str]] = {}
    for fname, docs in docs_by_file.items():
        for doc in docs:
            for field in ("apiVersion", "kind", "metadata"):
                need(field in doc, f"kuberay/{fname}: a document has no {field}")
            need(doc["metadata"].get("name"), f"kuberay/{fname}: a {doc['kind']} has no name")
            defined.setdefault(doc["kind"], set()).add(doc["metadata"]["name"])
            expected = "ray.io/v1" if doc["kind"] in ("RayCluster", "RayJob") else "v1"
            need(doc["apiVersion"] == expected,
                 f"kuberay/{fname}: {doc['kind']} apiVersion {doc['apiVersion']!r}, "
                 f"expected {expected}")
    need(defined.get("RayCluster") and defined.get("RayJob"),
         "cluster/kuberay: needs a RayCluster and a RayJob")
    secrets = defined.get("Secret", set())
    need(len(secrets) == 1, f"cluster/kuberay: expected one token Secret, found {secrets}")
    secret = next(iter(secrets))
    for fname, docs in docs_by_file.items():
        for doc in docs:
            where = f"kuberay/{fname}: {doc['kind']} {doc['metadata']['name']}"
            for node in _walk(doc):
                claim = node.get("persistentVolumeClaim", {}).get("claimName") \
                    if isinstance(node.get("persistentVolumeClaim"), dict) else None
                need(claim is None or claim in defined.get("PersistentVolumeClaim", set()),
                     f"{where}: PVC {claim!r} is not defined in cluster/kuberay")
                ref = node.get("secretKeyRef")
                need(not isinstance(ref, dict) or ref.get("name") in secrets,
                     f"{where}: Secret {ref and ref.get('name')!r} is not defined")
            if doc["kind"] == "PersistentVolumeClaim":
                need("ReadWriteMany" in doc["spec"].get("accessModes", []),
                     f"{where}: the shared volume must be ReadWriteMany")
            if doc["kind"] == "RayCluster":
                check_ray_cluster_spec(where, doc["spec"], image, secret)
            if doc["kind"] == "RayJob":
                check_ray_job(where, doc["spec"], image, secret)


def check_ray_job(where: str, spec: dict, image: str, secret: str) -> None:
    """A RayJob: entrypoint files exist in the image, a submitter with the token, a cluster."""
    entrypoint = spec.get("entrypoint", "")
    paths = re.findall(rf"{re.escape(IMAGE_WORKDIR)}/(\S+)", entrypoint)
    need(paths, f"{where}: the entrypoint names no file of the image ({IMAGE_WORKDIR}/...)")
    for rel in paths:
        need((REPO / rel).is_file(), f"{where}: entrypoint file {rel} is not in the repository")
    need(spec.get("shutdownAfterJobFinishes") is True,
         f"{where}: the cluster outlives the job (shutdownAfterJobFinishes)")
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode == "K8sJobMode":
        submitters = spec.get("submitterPodTemplate", {}).get("spec", {}).get("containers", [])
        need(submitters, f"{where}: no submitterPodTemplate (the submitter needs the token)")
        for container in submitters:
            need(container.get("image") == image, f"{where}: the submitter runs another image")
            need(_has_token_env(container.get("env"), secret),
                 f"{where}: the submitter lacks the token env")
            need(container.get("resources", {}).get("limits"),
                 f"{where}: the submitter has no resource limits")
    check_ray_cluster_spec(where, spec["rayClusterSpec"], image, secret)


# ---------------------------------------------------------------- the rest of cluster/


def check_no_wildcard_dashboard(texts: dict[str, str]) -> None:
    for name, text in texts.items():
        need("0.0.0.0" not in text, f"{name}: names 0.0.0.0 (the dashboard/job API must stay "
             "on loopback or the pod IP)")


def check_runtime_env(env: dict) -> None:
    """cluster/runtime_env.yaml: no editable pip install, working_dir + excludes, and env vars
    that agree with the project's defaults."""
    from ray.runtime_env import RuntimeEnv

    pip = env.get("pip") or []
    pip = pip.get("packages", []) if isinstance(pip, dict) else pip
    need(not any(str(p).strip().startswith(("-e", "--editable")) for p in pip),
         "runtime_env.yaml: `pip: -e .` fails on a cluster (working_dir reaches PYTHONPATH)")
    need(env.get("working_dir") == ".", "runtime_env.yaml: working_dir must be the checkout")
    excludes = set(env.get("excludes", []))
    for path in (".git", ".venv", "runs"):
        need(path in excludes, f"runtime_env.yaml: {path} is not excluded from the upload")
    for key, value in (env.get("env_vars") or {}).items():
        need(isinstance(value, str), f"runtime_env.yaml: env var {key} must be a string")
        need(RAY_ENV_DEFAULTS.get(key, value) == value,
             f"runtime_env.yaml: {key}={value} disagrees with RAY_ENV_DEFAULTS")
    try:
        RuntimeEnv(**env)
    except Exception as err:
        raise Defect(f"runtime_env.yaml: Ray refuses it: {err}") from err


def check_dockerfile(text: str, dockerignore: str) -> None:
    lines = [line.strip() for line in text.splitlines() if line.strip()
             and not line.lstrip().startswith("#")]
    base = [line for line in lines if line.startswith("FROM ")]
    need(base and re.fullmatch(rf"FROM rayproject/ray:{re.escape(ray.__version__)}-py311-cu\d+",
                               base[0]),
         f"Dockerfile: base {base[:1]} is not a pinned rayproject/ray:{ray.__version__} CUDA tag")
    pin = re.search(r"^torch==(\S+)", (REPO / "constraints-cpu.txt").read_text(), re.M)
    need(pin and re.search(rf"TORCH_VERSION={re.escape(pin[1])}\b", text),
         f"Dockerfile: torch is not pinned to {pin and pin[1]} (constraints-cpu.txt)")
    need(re.search(r'"torch==\$\{TORCH_VERSION\}"', text), "Dockerfile: torch install unpinned")
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    need(users and users[-1] in ("ray", "1000"), "Dockerfile: does not run as the Ray user")
    for line in lines:
        if line.startswith(("COPY", "ADD")):
            need("--chown=1000:100" in line or "--chown=ray" in line,
                 f"Dockerfile: {line!r} copies files owned by root")
    need(not re.search(r"pip install[^\n]*(\s-e\s|--editable)", text),
         "Dockerfile: an editable install (the image must hold the package)")
    need(re.search(r"pip install[^\n]*\s\"?\.(\[[\w,]+\])?\"?(\s|$)", text),
         "Dockerfile: no `pip install .`")
    ignored = {line.strip() for line in dockerignore.splitlines()}
    for path in (".git", ".venv", "tests", "runs"):
        need(path in ignored, f".dockerignore: {path} is not excluded from the build context")


# ---------------------------------------------------------------- the real files


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher(name):
    cfg = load_launchers()[name]
    check_launcher(name, cfg, project_image())
    check_launcher_spot(name, cfg)
    check_ray_prepare(name, cfg)


def test_launchers_share_image_and_paper_config_on_shared():
    images = {cfg["docker"]["image"] for cfg in load_launchers().values()}
    assert len(images) == 1, f"launchers disagree on the image: {images}"
    check_paper_config_on_shared()


def test_kuberay():
    check_kuberay(load_kuberay(), project_image())


def test_no_wildcard_dashboard():
    check_no_wildcard_dashboard(cluster_texts())


def test_runtime_env():
    check_runtime_env(yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text()))


def test_dockerfile():
    check_dockerfile((CLUSTER / "Dockerfile").read_text(), (REPO / ".dockerignore").read_text())


def test_job_env_var_keys(monkeypatch):
    """init_ray leaves out the env vars a submitted job's runtime env sets (Ray refuses a
    ray.init runtime env that sets one again)."""
    from elmm_ray.ray_session import job_env_var_keys

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert job_env_var_keys() == set()
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"env_vars": env["env_vars"]}}))
    assert job_env_var_keys() == set(env["env_vars"])
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "not json")
    with pytest.raises(RuntimeError, match="RAY_JOB_CONFIG_JSON_ENV_VAR"):
        job_env_var_keys()


# ---------------------------------------------------------------- every check can fail


def _launcher_defect(mutate: Callable[[dict], None], name: str = LAUNCHERS[0]
                     ) -> Callable[[], None]:
    def run() -> None:
        cfg = copy.deepcopy(load_launchers()[name])
        mutate(cfg)
        check_launcher(name, cfg, project_image())
        check_launcher_spot(name, cfg)
    return run


def _kuberay_defect(fname: str, mutate: Callable[[list[dict]], None]) -> Callable[[], None]:
    def run() -> None:
        docs = copy.deepcopy(load_kuberay())
        mutate(docs[fname])
        check_kuberay(docs, project_image())
    return run


def _runtime_env_defect(mutate: Callable[[dict], None]) -> Callable[[], None]:
    def run() -> None:
        env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
        mutate(env)
        check_runtime_env(env)
    return run


def _docker_defect(old: str, new: str, ignore_drop: str = "") -> Callable[[], None]:
    def run() -> None:
        text = (CLUSTER / "Dockerfile").read_text()
        assert old in text, f"the Dockerfile no longer has {old!r}: update this defect"
        ignore = (REPO / ".dockerignore").read_text()
        if ignore_drop:
            ignore = "\n".join(x for x in ignore.splitlines() if x.strip() != ignore_drop)
        check_dockerfile(text.replace(old, new), ignore)
    return run


def _head(docs: list[dict]) -> dict:
    return docs[0]["spec"]["headGroupSpec"]


def _worker(docs: list[dict]) -> dict:
    return docs[0]["spec"]["workerGroupSpecs"][0]


def _worker_container(docs: list[dict]) -> dict:
    return _worker(docs)["template"]["spec"]["containers"][0]


def _spot_group(docs: list[dict], job: bool = False) -> dict:
    spec = docs[0]["spec"]["rayClusterSpec"] if job else docs[0]["spec"]
    return next(g for g in spec["workerGroupSpecs"] if g["groupName"].endswith("-spot"))


def _rename_type(cfg: dict, old: str, new: str) -> None:
    cfg["available_node_types"][new] = cfg["available_node_types"].pop(old)


def _gcp_spot_scheduling(cfg: dict) -> dict:
    return cfg["available_node_types"]["a100_8x_spot"]["node_config"]["scheduling"][0]


DEFECTS: dict[str, Callable[[], None]] = {
    "schema: unknown key": _launcher_defect(lambda c: c.update(no_such_key=1)),
    "schema: max_workers a string": _launcher_defect(lambda c: c.update(max_workers="4")),
    "another image": _launcher_defect(lambda c: c["docker"].update(image="rayproject/ray")),
    "no bind mount": _launcher_defect(lambda c: c["docker"]["run_options"].remove(
        f"-v {SHARED}:{SHARED}")),
    "auth off": _launcher_defect(lambda c: c["docker"]["run_options"].remove(
        "-e RAY_AUTH_MODE=token")),
    "no EFS mount": _launcher_defect(lambda c: c.update(initialization_commands=[
        f"sudo mkdir -p {SHARED}"])),
    "no token copied": _launcher_defect(lambda c: c.update(file_mounts={})),
    "dashboard on every interface": _launcher_defect(lambda c: c.update(head_start_ray_commands=[
        "ray start --head --dashboard-host=0.0.0.0"])),
    "head does work": _launcher_defect(lambda c: c["available_node_types"]["head"].update(
        resources={"CPU": 16})),
    "no autoscaling": _launcher_defect(lambda c: c["available_node_types"]["a100_8x"].update(
        min_workers=2, max_workers=2)),
    "latest_dlami": _launcher_defect(lambda c: c["available_node_types"]["head"][
        "node_config"].update(ImageId="latest_dlami")),
    "spot: no Spot type": _launcher_defect(lambda c: c["available_node_types"].pop(
        "a100_8x_spot")),
    "spot: no on-demand type": _launcher_defect(lambda c: c["available_node_types"].pop(
        "a100_8x")),
    "spot: head on Spot": _launcher_defect(lambda c: c["available_node_types"]["head"][
        "node_config"].update(InstanceMarketOptions={"MarketType": "spot"})),
    "spot: no idle timeout": _launcher_defect(lambda c: c.pop("idle_timeout_minutes")),
    "spot: persistent request": _launcher_defect(lambda c: c["available_node_types"][
        "a100_8x_spot"]["node_config"]["InstanceMarketOptions"]["SpotOptions"].update(
        SpotInstanceType="persistent", InstanceInterruptionBehavior="stop")),
    "spot: on-demand wins the tie": _launcher_defect(lambda c: _rename_type(
        c, "a100_8x_spot", "a100_8_spot")),
    "spot: gcp head preemptible": _launcher_defect(lambda c: c["available_node_types"][
        "head"]["node_config"].update(scheduling=[{"preemptible": True}]), LAUNCHERS[1]),
    "spot: gcp STOP": _launcher_defect(lambda c: _gcp_spot_scheduling(c).update(
        instanceTerminationAction="STOP"), LAUNCHERS[1]),
    "spot: gcp legacy preemptible": _launcher_defect(lambda c: c["available_node_types"][
        "a100_8x_spot"]["node_config"].update(scheduling=[{
            "preemptible": True, "onHostMaintenance": "TERMINATE",
            "automaticRestart": False}]), LAUNCHERS[1]),
    "spot: gcp auto restart": _launcher_defect(lambda c: _gcp_spot_scheduling(c).update(
        automaticRestart=True), LAUNCHERS[1]),
    "k8s: no authOptions": _kuberay_defect("raycluster.yaml", lambda d: d[0]["spec"].pop(
        "authOptions")),
    "k8s: authOptions other Secret": _kuberay_defect("rayjob.yaml", lambda d: d[0]["spec"][
        "rayClusterSpec"]["authOptions"].update(secretName="generated")),
    "k8s: no idle timeout": _kuberay_defect("raycluster.yaml", lambda d: d[0]["spec"][
        "autoscalerOptions"].pop("idleTimeoutSeconds")),
    "k8s: head may land on Spot": _kuberay_defect("raycluster.yaml", lambda d: _head(d)[
        "template"]["spec"].pop("affinity")),
    "k8s: head on Spot": _kuberay_defect("raycluster.yaml", lambda d: _head(d)["template"][
        "spec"].update(nodeSelector={"cloud.google.com/gke-spot": "true"})),
    "k8s: no Spot group": _kuberay_defect("rayjob.yaml", lambda d: d[0]["spec"][
        "rayClusterSpec"]["workerGroupSpecs"].remove(_spot_group(d, job=True))),
    "k8s: Spot group no toleration": _kuberay_defect("raycluster.yaml", lambda d: _spot_group(
        d)["template"]["spec"]["tolerations"].pop()),
    "k8s: Spot group no nodeSelector": _kuberay_defect("raycluster.yaml", lambda d: _spot_group(
        d)["template"]["spec"]["nodeSelector"].pop("cloud.google.com/gke-spot")),
    "k8s: on-demand group may land on Spot": _kuberay_defect("raycluster.yaml", lambda d: _worker(
        d)["template"]["spec"].pop("affinity")),
    "k8s: on-demand wins the tie": _kuberay_defect("raycluster.yaml", lambda d: _spot_group(
        d).update(groupName="a0-spot")),
    "k8s: wget probe": _kuberay_defect("raycluster.yaml", lambda d: _head(d)["template"][
        "spec"]["containers"][0].update(livenessProbe={"exec": {"command": [
            "bash", "-c", "wget -q -O- http://localhost:8265/api/gcs_healthz"]}})),
    "k8s: no probe": _kuberay_defect("rayjob.yaml", lambda d: _spot_group(d, job=True)[
        "template"]["spec"]["containers"][0].pop("readinessProbe")),
    "k8s: kind missing": _kuberay_defect("storage.yaml", lambda d: d[0].pop("kind")),
    "k8s: PVC undefined": _kuberay_defect("storage.yaml", lambda d: d[0]["metadata"].update(
        name="other")),
    "k8s: Secret undefined": _kuberay_defect("secret.yaml", lambda d: d.clear()),
    "k8s: autoscaling off": _kuberay_defect("raycluster.yaml", lambda d: d[0]["spec"].update(
        enableInTreeAutoscaling=False)),
    "k8s: wrong rayVersion": _kuberay_defect("raycluster.yaml", lambda d: d[0]["spec"].update(
        rayVersion="2.9.0")),
    "k8s: head does work": _kuberay_defect("raycluster.yaml", lambda d: _head(d)[
        "rayStartParams"].pop("num-cpus")),
    "k8s: dashboard default": _kuberay_defect("raycluster.yaml", lambda d: _head(d)[
        "rayStartParams"].pop("dashboard-host")),
    "k8s: small driver": _kuberay_defect("rayjob.yaml", lambda d: d[0]["spec"][
        "rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "resources"]["limits"].update(memory="8Gi")),
    "k8s: no GPU": _kuberay_defect("raycluster.yaml", lambda d: [
        g["template"]["spec"]["containers"][0]["resources"][k].pop("nvidia.com/gpu")
        for g in d[0]["spec"]["workerGroupSpecs"] for k in ("requests", "limits")]),
    "k8s: fixed size": _kuberay_defect("raycluster.yaml", lambda d: _worker(d).update(
        minReplicas=2)),
    "k8s: another image": _kuberay_defect("raycluster.yaml", lambda d: _worker_container(
        d).update(image="rayproject/ray:2.60.0")),
    "k8s: no token": _kuberay_defect("raycluster.yaml", lambda d: _worker_container(d).update(
        env=[])),
    "k8s: no shared mount": _kuberay_defect("raycluster.yaml", lambda d: _worker_container(
        d).update(volumeMounts=[])),
    "k8s: submitter without token": _kuberay_defect("rayjob.yaml", lambda d: d[0]["spec"][
        "submitterPodTemplate"]["spec"]["containers"][0].update(env=[])),
    "k8s: entrypoint file missing": _kuberay_defect("rayjob.yaml", lambda d: d[0]["spec"].update(
        entrypoint=f"python {IMAGE_WORKDIR}/jobs/nope.py")),
    "k8s: cluster outlives job": _kuberay_defect("rayjob.yaml", lambda d: d[0]["spec"].update(
        shutdownAfterJobFinishes=False)),
    "wildcard anywhere": lambda: check_no_wildcard_dashboard(
        {**cluster_texts(), "cluster/x.yaml": "dashboard-host: 0.0.0.0"}),
    "runtime env -e": _runtime_env_defect(lambda e: e.update(pip=["-e ."])),
    "runtime env no excludes": _runtime_env_defect(lambda e: e.update(excludes=[])),
    "runtime env value drifts": _runtime_env_defect(lambda e: e["env_vars"].update(
        RAY_DATA_USE_DATASOURCE_V2="1")),
    "docker: unpinned base": _docker_defect("FROM rayproject/ray:2.60.0-py311-cu128",
                                            "FROM rayproject/ray:latest-gpu"),
    "docker: unpinned torch": _docker_defect('"torch==${TORCH_VERSION}"', "torch"),
    "docker: root": _docker_defect("USER ray", "USER root"),
    "docker: root-owned copy": _docker_defect("COPY --chown=1000:100 jobs", "COPY jobs"),
    "docker: editable": _docker_defect("-c /tmp/pins.txt \".[mlflow,wandb]\"",
                                       "-c /tmp/pins.txt -e \".[mlflow,wandb]\""),
    "dockerignore: .git": _docker_defect("USER ray", "USER ray", ignore_drop=".git"),
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_check_catches(defect):
    with pytest.raises(Defect):
        DEFECTS[defect]()

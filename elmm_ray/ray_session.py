"""Connecting to Ray: an existing cluster (``ray.address`` / ``RAY_ADDRESS``) or a local
in-process one bound to loopback. Only stage code that runs Ray calls this."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from pathlib import Path

from elmm_ray import console
from elmm_ray.config import RayConfig

log = logging.getLogger(__name__)

# Environment every local Ray session of ours wants (see docs/architecture.md, "Ray notes").
RAY_ENV_DEFAULTS = {
    # Per-file Parquet blocks: the V2 reader bin-packs small shards into one block.
    "RAY_DATA_USE_DATASOURCE_V2": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # A reused Tune actor (local trials) waits this long for a stopped trial's training thread
    # to end before the next trial starts in it (Ray's 2 s fails that next trial when a
    # loaded machine takes longer to unwind the stopped one).
    "TUNE_FUNCTION_THREAD_TIMEOUT_S": "30",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def job_env_var_keys() -> set[str]:
    """Environment variables the submitted Ray job's runtime env already sets (``ray job
    submit --runtime-env``): Ray refuses a ``ray.init`` runtime env that sets one of them
    again ("Failed to merge the Job's runtime env"), so the job's value stands."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return set()
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError) as err:
        raise RuntimeError(f"RAY_JOB_CONFIG_JSON_ENV_VAR is not the JSON Ray writes: {err}"
                           ) from err
    return set(runtime_env.get("env_vars") or {})


def init_ray(cfg: RayConfig | None = None, *, quiet: bool = True) -> None:
    """Start or join Ray once per process."""
    import ray

    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    console.quiet_libraries()  # Ray's console handler exists from `import ray` on
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    # Every worker gets the defaults, except those the submitted job's runtime env sets itself.
    job_keys = job_env_var_keys()
    env_vars = {k: os.environ[k] for k in RAY_ENV_DEFAULTS if k not in job_keys}
    runtime_env = {"env_vars": env_vars} if env_vars else None
    logging_level = logging.WARNING if quiet else logging.INFO
    # Workers' output reaches the console only with -v; otherwise it stays in Ray's session
    # logs, which save_ray_logs copies into the run directory.
    log_to_driver = console.verbose()
    if address:
        # Token authentication (Ray >= 2.60) is Ray's own: RAY_AUTH_MODE=token and the token
        # in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, read by ray.init; the
        # token is never copied into the runtime environment or the run directory.
        log.info("joining Ray cluster at %s", address)
        secure_token_file()
        try:
            ray.init(address=address, runtime_env=runtime_env, logging_level=logging_level,
                     log_to_driver=log_to_driver)
        except ray.exceptions.AuthenticationError as err:
            raise ConnectionError(f"the Ray cluster at {address} refused this client: "
                                  f"{str(err).strip()}") from None
    else:
        kwargs: dict = dict(include_dashboard=cfg.include_dashboard,
                            dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
                            runtime_env=runtime_env, logging_level=logging_level,
                            log_to_driver=log_to_driver)
        if cfg.num_cpus:
            kwargs["num_cpus"] = cfg.num_cpus
        ray.init(**kwargs)
        _STARTED_HERE["local"] = True
        secure_token_file()  # a new local cluster may just have written ~/.ray/auth_token
    import ray.data  # noqa: F401  (installs its console handler, which console quiets)

    console.quiet_libraries()
    log.info("Ray session logs: %s", ray_logs_dir())


_STARTED_HERE = {"local": False}  # this process started the local Ray it uses


def _token_paths(path: str | Path | None) -> list[Path]:
    if path is not None:
        return [Path(path).expanduser()]
    paths = [Path(p).expanduser() for p in [os.environ.get("RAY_AUTH_TOKEN_PATH")] if p]
    # Ray reads RAY_AUTH_TOKEN_PATH first but always writes a generated token to the default.
    return [*paths, Path.home() / ".ray" / "auth_token"]


def secure_token_file(path: str | Path | None = None) -> list[Path]:
    """Make Ray's token file readable by its owner only (mode 0600).

    Ray 2.60 writes ``~/.ray/auth_token`` with the process umask (0644 by default: every user
    of the machine can read the cluster's token). Without ``path`` this checks the file named
    by ``RAY_AUTH_TOKEN_PATH`` and ``~/.ray/auth_token``. A missing file is not an error; a
    file of another user, or one that cannot be changed, is left as it is with a warning.
    Returns the files whose mode was changed."""
    changed: list[Path] = []
    for token in dict.fromkeys(_token_paths(path)):
        try:
            # Opened once and changed through the descriptor: what is checked is what changes.
            fd = os.open(token, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            continue
        except OSError as err:  # EACCES, ...
            log.warning("could not check the Ray token file %s: %s", token, err)
            continue
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                log.warning("the Ray token path %s is not a regular file; left as it is", token)
                continue
            if info.st_uid != os.geteuid():
                if info.st_mode & 0o077:
                    log.warning("the Ray token file %s (mode %04o) belongs to another user; "
                                "left as it is", token, stat.S_IMODE(info.st_mode))
                continue
            if info.st_mode & 0o077:
                os.fchmod(fd, 0o600)
                changed.append(token)
                log.info("made the Ray token file %s private (0600)", token)
        except OSError as err:
            log.warning("could not make the Ray token file %s private: %s", token, err)
        finally:
            os.close(fd)
    return changed


def ray_logs_dir() -> Path | None:
    """The Ray session log folder of the local Ray this process started (a cluster it joined,
    e.g. as a submitted job, keeps its logs there: other jobs' logs are not ours to copy)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if not ray.is_initialized() or node is None or not _STARTED_HERE["local"]:
        return None
    path = Path(node.get_logs_dir_path())
    return path if path.is_dir() else None


def save_ray_logs(dest: str | Path, max_file_bytes: int = 50 * 2**20) -> int:
    """Copy the local Ray session's logs (workers, Ray Data, Train controller, raylet) into
    ``dest``; files over ``max_file_bytes`` keep their last ``max_file_bytes``. Returns the
    number of files copied (0 when Ray runs elsewhere: its logs stay on the cluster)."""
    source = ray_logs_dir()
    if source is None:
        return 0
    dest = Path(dest)
    copied = 0
    for path in source.rglob("*"):
        if not path.is_file() or path.suffix not in (".log", ".out", ".err", ".txt"):
            continue
        target = dest / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            size = path.stat().st_size
            if size <= max_file_bytes:
                shutil.copyfile(path, target)
            else:
                with path.open("rb") as src, target.open("wb") as out:
                    src.seek(size - max_file_bytes)
                    out.write(src.read())
        except OSError as err:  # a file Ray rotates or removes meanwhile
            log.info("could not copy %s: %s", path, err)
            continue
        copied += 1
    return copied


def on_every_other_node(fn, *args, done: set[str] | None = None) -> list[str]:
    """``fn(*args)`` once on every alive node but this one (a CPU-free task pinned to each,
    Ray up), skipping and then adding to ``done`` (node ids); returns the nodes it ran on.
    Without Ray, or on one node: nothing."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        return []
    done = set() if done is None else done
    here = ray.get_runtime_context().get_node_id()
    nodes = [n["NodeID"] for n in ray.nodes()
             if n.get("Alive") and n["NodeID"] != here and n["NodeID"] not in done]
    task = ray.remote(num_cpus=0, max_retries=1)(fn)
    ray.get([task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
                          ).remote(*args) for node in nodes])
    done.update(nodes)
    return nodes

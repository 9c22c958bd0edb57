"""Connecting to Ray: an existing cluster (``ray.address`` / ``RAY_ADDRESS``) or a local
in-process one bound to loopback. Only stage code that runs Ray calls this."""

from __future__ import annotations

import logging
import os

from elmm_ray.config import RayConfig

log = logging.getLogger(__name__)

# Environment every local Ray session of ours wants (see docs/architecture.md, "Ray notes").
RAY_ENV_DEFAULTS = {
    # Per-file Parquet blocks: the V2 reader bin-packs small shards into one block.
    "RAY_DATA_USE_DATASOURCE_V2": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def init_ray(cfg: RayConfig | None = None, *, quiet: bool = True) -> None:
    """Start or join Ray once per process."""
    import ray

    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    runtime_env = {"env_vars": {k: os.environ[k] for k in RAY_ENV_DEFAULTS}}
    logging_level = logging.WARNING if quiet else logging.INFO
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging_level)
        return
    kwargs: dict = dict(include_dashboard=cfg.include_dashboard, dashboard_host="127.0.0.1",
                        _node_ip_address="127.0.0.1", runtime_env=runtime_env,
                        logging_level=logging_level)
    if cfg.num_cpus:
        kwargs["num_cpus"] = cfg.num_cpus
    ray.init(**kwargs)

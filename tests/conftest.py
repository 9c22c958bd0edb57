"""Shared fixtures: paths, the real datasets of ../shared/data, one Ray session per run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shared_dataset(name: str) -> Path:
    """A dataset folder of ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real dataset {name} not found at {path} (../shared/data is absent)")
    return path


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray session (loopback, 2 CPUs) shared by every Ray test of the run."""
    import ray

    from elmm_ray.config import RayConfig
    from elmm_ray.ray_session import init_ray

    os.environ.setdefault("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    init_ray(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()

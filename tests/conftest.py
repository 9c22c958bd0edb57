"""Shared fixtures: paths, the real datasets of ../shared/data, one Ray session per run."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Fake AWS credentials for the S3 server of `s3_server`, set before any Ray process starts
# (Ray workers inherit this environment): no test can reach a real bucket with real keys.
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                  AWS_SESSION_TOKEN="testing", AWS_DEFAULT_REGION="us-east-1",
                  AWS_EC2_METADATA_DISABLED="true")
for _key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_key, None)


def pytest_configure(config):
    """Mirrors of run directories on object storage (elmm_ray/remote.py) go to a cache of
    this test run, not the user's ~/.cache/elmm_ray; Ray workers and commands the tests start
    inherit it (tests that model several machines set their own). A hook, not import-time
    code: a Ray worker that imports a test module (and so this one) keeps what it was given."""
    cache = tempfile.mkdtemp(prefix="elmm-test-run-cache-")
    os.environ["ELMM_RUN_CACHE"] = cache
    config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))


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


@dataclass(frozen=True)
class PipelineRun:
    """One uninterrupted run of the whole tiny pipeline on Ray (``elmm-ray run``)."""

    run_dir: Path
    snapshot: dict  # tests/faultmatrix.py snapshot(): row counts and figures of every stage
    console: str  # its stdout and stderr (not a terminal)


@pytest.fixture(scope="session")
def ray_pipeline_run(tmp_path_factory) -> PipelineRun:
    """``elmm-ray run`` of the fault matrix's Ray config (tests/faultmatrix.py ``RAY_RUN``:
    every stage, Ray Data, Ray Train, pruning on workers) in a subprocess with a local Ray of
    its own, its driver forbidden to build the model; run once, for the fault matrix's
    uninterrupted baseline and the console's checks."""
    from tests import faultmatrix as fm

    work = tmp_path_factory.mktemp("ray_pipeline")
    run, snapshot = fm.baseline(work, fm.RAY_RUN, orchestrator=True)
    return PipelineRun(run, snapshot, fm.console_output(fm.baseline_log(work)))


@dataclass(frozen=True)
class S3Server:
    """An S3-compatible server for object-storage tests: its endpoint and one bucket."""

    endpoint: str
    bucket: str

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key in the bucket under ``prefix``."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint)
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a free port, in a thread of this process) with the
    bucket `elmm-test`; credentials are the fake ones set above."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = S3Server(endpoint=f"http://{host}:{port}", bucket="elmm-test")
    boto3.client("s3", endpoint_url=s3.endpoint).create_bucket(Bucket=s3.bucket)
    yield s3
    server.stop()

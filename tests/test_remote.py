"""Run directories on object storage (`run_dir: s3://...`): the mirror's push and pull
against the S3 server of `s3_server`, and the tiny pipeline run there end to end."""

from __future__ import annotations

import pytest

from elmm_ray.config import load_config
from elmm_ray.layout import RunLayout
from elmm_ray.pipeline import run_all
from elmm_ray.remote import RemoteMirror, join_uri, mirror_dir, with_endpoint
from tests.conftest import REPO_ROOT
from tests.tiny import TINY


def _mirror(s3_server, prefix: str, local) -> RemoteMirror:
    return RemoteMirror(f"s3://{s3_server.bucket}/{prefix}", s3_server.endpoint, local)


def test_uri_helpers(monkeypatch, tmp_path):
    uri = with_endpoint("s3://b/runs/x", "http://127.0.0.1:9000")
    assert uri == "s3://b/runs/x?endpoint_override=http%3A%2F%2F127.0.0.1%3A9000"
    assert join_uri(uri, "features") == (
        "s3://b/runs/x/features?endpoint_override=http%3A%2F%2F127.0.0.1%3A9000")
    assert with_endpoint("gs://b/x", "http://h:1") == "gs://b/x"  # S3 only
    monkeypatch.setenv("ELMM_RUN_CACHE", str(tmp_path))
    assert mirror_dir("s3://b/runs/x/") == tmp_path / "s3" / "b" / "runs" / "x"
    for bad in ("s3://", "s3://b/../x"):
        with pytest.raises(ValueError, match="bucket and a prefix"):
            mirror_dir(bad)


def test_push_then_pull_into_a_new_mirror(s3_server, tmp_path):
    one = _mirror(s3_server, "sync", tmp_path / "one")
    (one.local / "train" / "model").mkdir(parents=True)
    (one.local / "train" / "model" / "w.bin").write_bytes(b"\x00" * 1000)
    (one.local / "manifests").mkdir()
    (one.local / "manifests" / "train.json").write_text('{"status": "complete"}')
    (one.local / "features").mkdir()  # lives on the object store itself: never mirrored
    (one.local / "features" / "part.bin").write_bytes(b"x")
    (one.local / "train" / ".w.bin.abc.tmp").write_bytes(b"half")  # a write in progress
    order = []
    upload = one._upload
    one._upload = lambda rel: (order.append(rel), upload(rel))
    assert one.push() == {"uploaded": 2, "deleted": 0}
    assert order == ["train/model/w.bin", "manifests/train.json"]  # the manifest last
    assert set(s3_server.keys("sync/")) == {"sync/train/model/w.bin", "sync/manifests/train.json"}
    assert one.push() == {"uploaded": 0, "deleted": 0}  # nothing changed

    partial = _mirror(s3_server, "sync", tmp_path / "partial")  # what a Ray worker pulls
    assert partial.pull(skip=("train",)) == {"fetched": 1, "removed": 0, "files": 1}
    assert not (partial.local / "train").exists()

    two = _mirror(s3_server, "sync", tmp_path / "two")
    assert two.pull() == {"fetched": 2, "removed": 0, "files": 2}
    assert (two.local / "train" / "model" / "w.bin").read_bytes() == b"\x00" * 1000
    assert two.pull()["fetched"] == 1  # only the manifest, fetched every time

    # A stage of the first mirror replaces its outputs: deleted and changed files travel.
    (one.local / "train" / "model" / "w.bin").unlink()
    (one.local / "manifests" / "train.json").write_text('{"status": "running", "x": 1}')
    assert one.push() == {"uploaded": 1, "deleted": 1}
    assert two.pull() == {"fetched": 1, "removed": 1, "files": 1}
    assert not (two.local / "train" / "model" / "w.bin").exists()
    assert '"running"' in (two.local / "manifests" / "train.json").read_text()


def test_an_unwritable_bucket_is_named(s3_server, tmp_path):
    mirror = RemoteMirror("s3://no-such-bucket/x", s3_server.endpoint, tmp_path)
    with pytest.raises(ConnectionError, match="run_dir 's3://no-such-bucket/x' cannot be "
                                              "written.*storage_endpoint"):
        mirror.check_writable()


@pytest.mark.slow
def test_the_pipeline_runs_in_a_run_directory_on_s3(s3_server, tmp_path, monkeypatch):
    """`elmm-ray run`'s stages with run_dir on the S3 server (local training): the feature
    store is written to the bucket, every output and manifest reaches it, and a machine with
    an empty mirror finds every stage complete with the same figures."""
    monkeypatch.setenv("ELMM_RUN_CACHE", str(tmp_path / "machine1"))
    uri = f"s3://{s3_server.bucket}/pipeline"
    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml",
                      [f"run_dir={uri}", f"storage_endpoint={s3_server.endpoint}", *TINY,
                       "train.epochs=1"])
    first = run_all(cfg, show_progress=False)
    keys = set(s3_server.keys("pipeline/"))
    for stage in ("synth", "pack", "extract", "train", "eval", "export"):
        assert f"pipeline/manifests/{stage}.json" in keys, stage
    assert any(k.startswith("pipeline/features/") for k in keys)  # the store is in the bucket
    assert "pipeline/export/elmm_export.json" in keys and "pipeline/train/summary.json" in keys
    assert not (RunLayout.of(cfg).root / "features").exists()

    monkeypatch.setenv("ELMM_RUN_CACHE", str(tmp_path / "machine2"))
    again = run_all(cfg, show_progress=False)
    assert set(again["timings"]) == set(first["timings"])
    assert all(seconds == 0.0 for seconds in again["timings"].values())  # all skipped
    assert again["metrics"] == first["metrics"]

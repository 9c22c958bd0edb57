"""Ray Train storage (`train.storage_path`, `train.storage_endpoint`): the config rules, how
the location opens (local path or object storage through pyarrow.fs, checked from the
driver), and what the driver says when rank 0's outputs are not on its machine. The training
runs with checkpoints on S3 are in tests/test_train_ray.py."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from elmm_ray.config import ConfigError, load_config
from elmm_ray.layout import RunLayout, absolute_paths
from elmm_ray.stages.base import stage_fingerprint
from elmm_ray.train.trainer import _check_rank0_outputs, checkpoint_uri, train_storage
from tests.conftest import REPO_ROOT


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(REPO_ROOT / "configs" / "demo.yaml",
                       [f"run_dir={tmp_path / 'run'}", *overrides])


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.storage_path=hdfs://name/x"], "`train.storage_path` = 'hdfs://name/x': unknown "
     "scheme 'hdfs'"),
    (["run_dir=hdfs://name/x"], "`run_dir` = 'hdfs://name/x': unknown scheme"),
    (["storage_endpoint=http://127.0.0.1:9000"], "is for s3:// locations"),
    (["train.storage_path=gs://b/x", "storage_endpoint=http://127.0.0.1:9000"],
     "is for s3:// locations"),
    (["train.storage_path=s3://b/x", "storage_endpoint=127.0.0.1:9000"],
     "give the scheme too"),
])
def test_storage_keys_are_checked(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, *overrides)
    assert message in str(err.value)


def test_old_train_storage_endpoint_is_migrated(tmp_path, caplog):
    cfg = _cfg(tmp_path, "train.storage_path=s3://b/x",
               "train.storage_endpoint=http://127.0.0.1:9000")
    assert cfg.storage_endpoint == "http://127.0.0.1:9000"
    assert "`train.storage_endpoint` is now `storage_endpoint`" in caplog.text


def test_local_storage_defaults_to_the_run_directory(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    assert train_storage(cfg) == (str(RunLayout.of(cfg).ray_train_storage), None)
    monkeypatch.chdir(tmp_path)
    relative = absolute_paths(_cfg(tmp_path, "train.storage_path=shared/ckpt"))
    assert train_storage(relative) == (str(tmp_path / "shared" / "ckpt"), None)


def test_s3_storage_opens_with_the_endpoint_that_travels_to_workers(tmp_path, s3_server,
                                                                    monkeypatch):
    cfg = _cfg(tmp_path, f"train.storage_path=s3://{s3_server.bucket}/runs/a",
               f"storage_endpoint={s3_server.endpoint}")
    path, fs = train_storage(cfg)
    assert path == f"{s3_server.bucket}/runs/a"
    assert isinstance(fs, pafs.S3FileSystem)
    # What the controller and the workers get: the pickled filesystem, endpoint included.
    remote = pickle.loads(pickle.dumps(fs))
    with remote.open_output_stream(f"{path}/probe.txt") as f:
        f.write(b"ok")
    assert "runs/a/probe.txt" in s3_server.keys("runs/a/")
    # Without the key, pyarrow takes AWS_ENDPOINT_URL (read on the driver, sent along too).
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    path, fs = train_storage(_cfg(tmp_path, f"train.storage_path=s3://{s3_server.bucket}/b"))
    assert pickle.loads(pickle.dumps(fs)).get_file_info(path).type == pafs.FileType.Directory


def test_unreachable_storage_fails_on_the_driver_naming_the_key(tmp_path, s3_server):
    cfg = _cfg(tmp_path, "train.storage_path=s3://no-such-bucket/x",
               f"storage_endpoint={s3_server.endpoint}")
    with pytest.raises(ConfigError, match=r"`train.storage_path` = 's3://no-such-bucket/x': "
                                          r"Ray Train's storage cannot be written.*bucket"):
        train_storage(cfg)


def test_storage_location_is_not_part_of_the_train_fingerprint(tmp_path):
    """Moving the checkpoints does not change what training computes: no retraining."""
    plain = _cfg(tmp_path)
    moved = _cfg(tmp_path, "train.storage_path=s3://b/x",
                 "storage_endpoint=http://127.0.0.1:9000")
    upstream = {"entity_init": "e", "pack": "p", "extract": "x"}
    assert stage_fingerprint("train", plain, upstream) == stage_fingerprint("train", moved,
                                                                            upstream)
    changed = _cfg(tmp_path, "train.seed=1")  # a key that does change it, for contrast
    assert stage_fingerprint("train", plain, upstream) != stage_fingerprint("train", changed,
                                                                            upstream)


def test_checkpoint_uri_names_the_scheme(tmp_path, s3_server):
    class Checkpoint:
        def __init__(self, path, filesystem):
            self.path, self.filesystem = path, filesystem

    s3 = pafs.S3FileSystem(endpoint_override=s3_server.endpoint)
    assert checkpoint_uri(Checkpoint("b/run/checkpoint_1", s3)) == "s3://b/run/checkpoint_1"
    assert checkpoint_uri(Checkpoint("/r/checkpoint_1", pafs.LocalFileSystem())) == (
        "/r/checkpoint_1")
    assert checkpoint_uri(None) is None


def test_driver_says_when_rank0_outputs_are_on_another_node(tmp_path):
    started = time.time()
    with pytest.raises(FileNotFoundError, match="every node mounts"):
        _check_rank0_outputs(tmp_path / "train", started)
    (tmp_path / "train" / "model").mkdir(parents=True)
    (tmp_path / "train" / "model" / "trainable.json").write_text("{}")
    (tmp_path / "train" / "summary.json").write_text("{}")
    _check_rank0_outputs(tmp_path / "train", started)
    # An earlier run's outputs, left where rank 0 of this one did not write: refused.
    old = started - 3600
    os.utime(tmp_path / "train" / "summary.json", (old, old))
    with pytest.raises(RuntimeError, match="older than this run: it is an earlier run's"):
        _check_rank0_outputs(tmp_path / "train", started)

"""A hub checkpoint is fetched once per node under a file lock in the HF cache, and loaded
from there with ``local_files_only`` (elmm_ray.models.hub); all offline: fake downloaders,
never the network."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from elmm_ray.models import hub

REPO_ID = "some-org/some-llava"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "_fetched", {})
    return cache


def _fake_snapshot(log: Path, cache: Path):
    def download(name: str, trust_remote_code: bool) -> str:
        with open(log, "a") as f:  # one line per download, whichever process
            f.write(f"{name}\n")
        time.sleep(0.3)  # long enough for the others to queue on the lock
        snapshot = cache / "snapshots" / "abc"
        snapshot.mkdir(parents=True, exist_ok=True)
        (snapshot / "config.json").write_text("{}")
        return str(snapshot)
    return download


def _process(cache: str, log: str, out: str) -> None:
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_CACHE = cache
    Path(out).write_text(hub.prefetch(REPO_ID, downloader=_fake_snapshot(Path(log),
                                                                       Path(cache))))


def test_what_is_fetched():
    assert hub.is_hub_id("llava-hf/llava-1.5-7b-hf")
    assert not hub.is_hub_id("tiny")
    assert not hub.is_hub_id("./checkpoints/llava")
    assert not hub.is_hub_id("/nonexistent/a/b")
    assert not hub.is_hub_id(Path(__file__).parent)  # an existing directory


def test_processes_of_a_node_share_one_download(hf_cache, tmp_path):
    log, ctx = tmp_path / "downloads.log", multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_process, args=(str(hf_cache), str(log), str(tmp_path / f"{i}")))
             for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert log.read_text().splitlines() == [REPO_ID]  # one download, three processes
    snapshots = {(tmp_path / f"{i}").read_text() for i in range(3)}
    assert snapshots == {str(hf_cache / "snapshots" / "abc")}
    # a later process (another stage) reads the node's record: no request to the hub
    fake = _fake_snapshot(log, hf_cache)
    assert hub.prefetch(REPO_ID, downloader=fake) in snapshots
    assert len(log.read_text().splitlines()) == 1
    # a record whose files went missing is fetched again
    for f in (hf_cache / "snapshots" / "abc").iterdir():
        f.unlink()
    hub._fetched.clear()
    hub.prefetch(REPO_ID, downloader=fake)
    assert len(log.read_text().splitlines()) == 2


def test_local_directory_and_tiny_fetch_nothing(hf_cache, tmp_path):
    def never(name, code):
        raise AssertionError("nothing to download")

    assert hub.prefetch("tiny", downloader=never) is None
    assert hub.prefetch(str(tmp_path), downloader=never) is None
    calls = []
    assert hub.local_first(lambda n, **kw: calls.append(kw) or n, str(tmp_path)) == str(tmp_path)
    assert calls == [{}]  # a directory: loaded as it is, no local_files_only


def test_local_first_loads_from_the_cache_and_fetches_a_missing_checkpoint_once(
        hf_cache, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    log = tmp_path / "downloads.log"
    monkeypatch.setattr(hub, "_snapshot", _fake_snapshot(log, hf_cache))
    seen = []

    def load(name, *, local_files_only=False, trust_remote_code=False):
        seen.append(local_files_only)
        if not (hf_cache / "snapshots" / "abc" / "config.json").is_file():
            raise OSError(f"{name} is not in the cache")
        return "model"

    assert hub.local_first(load, REPO_ID, trust_remote_code=False) == "model"
    assert seen == [True, True] and len(log.read_text().splitlines()) == 1
    assert hub.local_first(load, REPO_ID) == "model"  # in the cache now: no fetch
    assert seen == [True, True, True] and len(log.read_text().splitlines()) == 1


def test_offline_a_missing_checkpoint_is_not_fetched(hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_snapshot", lambda *a: pytest.fail("fetched while offline"))

    def load(name, **kwargs):
        raise OSError("not in the cache")

    with pytest.raises(OSError, match="not in the cache"):
        hub.local_first(load, REPO_ID)


def test_prepare_backbone_fetches_hub_ids_only(hf_cache, tmp_path, monkeypatch):
    from elmm_ray.config import load_config
    from elmm_ray.train import context

    log = tmp_path / "downloads.log"
    monkeypatch.setattr(hub, "_snapshot", _fake_snapshot(log, hf_cache))
    repo = Path(__file__).resolve().parents[1]
    tiny = load_config(None)  # model.backbone: tiny by default
    assert context.prepare_backbone(tiny) == [] and not log.exists()
    paper = load_config(repo / "configs" / "fb15k237_llava7b.yaml")
    assert context.prepare_backbone(paper) == []  # no Ray here: this node only
    assert log.read_text().splitlines() == ["llava-hf/llava-1.5-7b-hf"]


NODES_SCRIPT = r"""
import json, os, sys
from pathlib import Path
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import ray
from ray.cluster_utils import Cluster
from elmm_ray.config import load_config
from elmm_ray.ray_session import init_ray
from elmm_ray.train.context import prepare_backbone

caches = json.loads(sys.argv[1])
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False})
for cache in caches:
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1",
                     env_vars={"HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"})
try:
    cfg = load_config(None, ["model.backbone=%s" % sys.argv[2], "ray.address=" + cluster.address])
    init_ray(cfg.ray)
    first, again = prepare_backbone(cfg), prepare_backbone(cfg)
    print(json.dumps({"first": first, "again": again,
                      "workers": [n["NodeID"] for n in ray.nodes() if n["Resources"].get("CPU")]}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def _seed_cache(cache: Path) -> Path:
    """A hub id's snapshot as the HF cache lays it out (what an offline node finds)."""
    repo = cache / ("models--" + REPO_ID.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "config.json").write_text("{}")
    return repo / "snapshots" / "0123abcd"


@pytest.mark.slow
@pytest.mark.ray
def test_prepare_backbone_fetches_once_on_every_node(tmp_path):
    """A local cluster (a head node without CPUs for the driver, two worker nodes of 1 CPU,
    each its own HF cache, offline): one task per worker node records the snapshot in its
    node's cache; a second call (the next stage) sends none."""
    caches = [tmp_path / f"node{i}" for i in range(3)]  # the head's (driver's), then workers'
    snapshots = [_seed_cache(c) for c in caches]
    repo_root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo_root), "HF_HUB_CACHE": str(caches[0]),
           "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    ray_tmp = tempfile.mkdtemp(prefix="hub", dir="/tmp")  # Ray's socket paths stay short
    try:
        done = subprocess.run([sys.executable, "-c", NODES_SCRIPT,
                               json.dumps([str(c) for c in caches[1:]]), REPO_ID],
                              cwd=repo_root, env={**env, "RAY_TMPDIR": ray_tmp},
                              capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(result["first"]) == sorted(result["workers"]) and len(result["workers"]) == 2
    assert result["again"] == []
    for cache, snapshot in zip(caches, snapshots, strict=True):
        record = cache / ".locks" / "elmm_ray" / (REPO_ID.replace("/", "--") + ".lock.done")
        assert record.read_text() == str(snapshot)  # each node fetched (here: found) it once


def test_a_failed_fetch_names_the_checkpoint_and_the_way_out(hf_cache):
    def offline(name, code):
        raise FileNotFoundError("no cached snapshot")

    with pytest.raises(OSError, match=f"(?s){REPO_ID}.*no cached snapshot.*hf download"):
        hub.prefetch(REPO_ID, downloader=offline)
    assert not list(hf_cache.glob(".locks/elmm_ray/*.done"))  # nothing recorded


def test_a_cached_hub_checkpoint_loads_without_the_hub(hf_cache, monkeypatch):
    """The loaders pass local_files_only to transformers and read the snapshot of the cache
    (a tiny Llava saved into the HF cache layout; HF_HUB_OFFLINE unset, the hub unreachable
    by construction: every fetch fails)."""
    import huggingface_hub.constants

    from elmm_ray.data.feature_store import vision_geometry, vision_safetensors_files
    from elmm_ray.models.backbone import build_tiny_llava, load_backbone, load_vision_tower

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_snapshot", lambda *a: pytest.fail("fetched from the hub"))
    snapshot = _seed_cache(hf_cache)
    build_tiny_llava(vision_hidden=32, vision_layers=2, vision_heads=4, image_size=32,
                     patch_size=8, llm_hidden=32, llm_layers=1, llm_heads=4, llm_kv_heads=2,
                     llm_intermediate=64, vocab_size=50, image_token_id=4,
                     pad_token_id=0).save_pretrained(snapshot)
    model = load_backbone(REPO_ID)
    assert model.config.text_config.hidden_size == 32
    files = vision_safetensors_files(REPO_ID)
    assert files and all(f.startswith(str(snapshot)) for f in files)
    assert sum(p.numel() for p in load_vision_tower(REPO_ID, files).parameters()) > 0
    assert vision_geometry(REPO_ID, 1, -2)["tokens"] == 16

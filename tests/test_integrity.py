"""Corruption is detected, never trusted; environment faults give a clear error and leave
nothing half-committed (:mod:`elmm_ray.integrity`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from elmm_ray.cli import main
from elmm_ray.config import load_config
from elmm_ray.data import extraction as X
from elmm_ray.data import feature_store as F
from elmm_ray.data.kg import load_kg
from elmm_ray.data.shards import pack_complete, pack_images, verify_shards
from elmm_ray.data.synth import MANIFEST_NAME as SYNTH_MANIFEST
from elmm_ray.integrity import (
    CorruptionError,
    intact,
    record_checksums,
    sha256_file,
    verify_checksums,
)
from elmm_ray.layout import RunLayout, absolute_paths, read_json
from elmm_ray.train.checkpoint_integrity import record_checkpoint, verify_resume
from tests.test_pack import _dataset
from tests.tiny import TINY

REPO_ROOT = Path(__file__).resolve().parents[1]


def flip_byte(path: Path, where: float = 0.6) -> None:
    """Flip one byte well inside the file (past any header)."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * where)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_checksums_name_the_file_and_quarantine_it(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(os.urandom(4096))
    (tmp_path / "sub" / "b.bin").write_bytes(os.urandom(4096))
    record_checksums(tmp_path)
    assert verify_checksums(tmp_path, "way out") == 2 and intact(tmp_path)
    flip_byte(tmp_path / "sub" / "b.bin")
    assert intact(tmp_path)  # the cheap check sees sizes only
    with pytest.raises(CorruptionError, match=r"sub/b\.bin: sha256 .*flipped.*; way out"):
        verify_checksums(tmp_path, "way out", quarantine_bad=True)
    assert (tmp_path / "sub" / "b.bin.corrupt").is_file() and not intact(tmp_path)
    truncate(tmp_path / "a.bin")
    with pytest.raises(CorruptionError, match=r"a\.bin: size 2048 bytes, recorded 4096"):
        verify_checksums(tmp_path, "way out")
    (tmp_path / "checksums.json").write_text('{"algorithm": "sha2')  # truncated record
    assert not intact(tmp_path)
    with pytest.raises(CorruptionError, match=r"checksums\.json is not valid JSON"):
        verify_checksums(tmp_path, "way out")


def test_unreadable_stage_manifest_means_not_complete(tmp_path, caplog):
    layout = RunLayout(tmp_path)
    layout.write_manifest("pack", {"status": "complete", "fingerprint": "abc"})
    assert layout.is_complete("pack", "abc")
    text = layout.manifest_path("pack").read_text()
    layout.manifest_path("pack").write_text(text[: len(text) // 2])
    assert layout.read_manifest("pack") is None and not layout.is_complete("pack", "abc")
    assert "pack.json is unreadable" in caplog.text and "reruns" in caplog.text


def test_corrupt_shard_is_named_and_repacked_alone(tmp_path):
    root, _, _ = _dataset(tmp_path / "ds", n_entities=12)
    kg = load_kg(root)
    out = tmp_path / "shards"
    first = pack_images(kg, out, max_shard_bytes=600, use_ray=False, show_progress=False)
    shards = first.manifest["shards"]
    assert len(shards) >= 3
    victim = out / shards[1]["file"]
    flip_byte(victim)
    with pytest.raises(CorruptionError, match=rf"{victim.name}: sha256 .*elmm-ray pack"):
        verify_shards(out, first.manifest)
    assert not pack_complete(out)  # moved aside: the pack stage is due again
    second = pack_images(kg, out, max_shard_bytes=600, use_ray=False, show_progress=False)
    assert second.manifest["shards_reused"] == len(shards) - 1
    assert second.manifest["shards"] == shards  # the same bytes again
    assert verify_shards(out, second.manifest)["shards"] == len(shards)
    # A truncated pack manifest: not complete (a warning), every intact shard reused.
    text = (out / "manifest.json").read_text()
    (out / "manifest.json").write_text(text[:40])
    assert not pack_complete(out)
    fourth = pack_images(kg, out, max_shard_bytes=600, use_ray=False, show_progress=False)
    assert fourth.manifest["shards_reused"] == len(shards)
    assert fourth.manifest["shards"] == shards


def _hand_written_store(path: Path) -> dict:
    """A complete store of two parts written by the extract writer (no Ray)."""
    meta = {"version": F.STORE_VERSION, "num_entities": 6, "max_images_per_entity": 2,
            "tokens": 3, "width": 5, "fingerprint": "x"}
    loc = F.StoreLocation(path)
    loc.mkdir(F.PARTS)
    loc.write_json(F.METADATA, meta)
    rng = np.random.default_rng(0)
    for batch in ([(4, 1), (0, 0), (4, 0)], [(0, 1), (2, 0), (5, 0)]):
        X._write_part({"entity": np.array([e for e, _ in batch]),
                       "entity_id": np.array([f"E{e}" for e, _ in batch], dtype=object),
                       "image_index": np.array([k for _, k in batch]),
                       "error": np.array([""] * len(batch), dtype=object),
                       "features": rng.standard_normal((len(batch), 3, 5)).astype(np.float16)},
                      store=str(path))
    checksums: dict = {}
    fragments, _ = F.read_fragments(loc, checksums)
    index = F.write_index(loc, fragments)
    loc.write_json(F.MANIFEST, {"status": "complete", "fingerprint": "x",
                                "checksums": {"index": index, "parts": checksums}})
    return checksums


def test_corrupt_part_is_named_and_leaves_the_committed_set(tmp_path):
    checksums = _hand_written_store(tmp_path)
    F.FeatureStore.open(tmp_path).features_for(range(6))  # clean: every part checks out
    part = sorted(checksums)[0]
    for name, rec in checksums.items():
        assert rec["sha256"] == sha256_file(tmp_path / F.PARTS / f"{name}.npy")
    flip_byte(tmp_path / F.PARTS / f"{part}.npy", 0.9)
    fresh = F.FeatureStore.open(tmp_path)
    with pytest.raises(CorruptionError, match=rf"{part}\.npy.*rerun `elmm-ray extract`"):
        fresh.features_for(range(6))
    assert not (tmp_path / F.MANIFEST).exists()  # incomplete: the extract stage is due
    committed, parts = F.read_fragments(F.StoreLocation(tmp_path))
    assert part not in parts and len(parts) == 1
    assert (tmp_path / F.PARTS / f"{part}.npy.corrupt").is_file()
    with pytest.raises(RuntimeError, match="incomplete"):
        F.FeatureStore.open(tmp_path)


def _count_hashing(monkeypatch, also=None) -> list:
    from elmm_ray import integrity

    hashed: list = []
    real = integrity.sha256_stream

    def counting(f):
        hashed.append(f.name)
        if also:
            also(f.name)
        return real(f)

    monkeypatch.setattr(integrity, "sha256_stream", counting)
    return hashed


def _part_file(tmp_path: Path, checksums: dict, i: int = 0) -> Path:
    return tmp_path / "store" / F.PARTS / f"{sorted(checksums)[i]}.npy"


def test_a_part_is_hashed_once_per_node_and_a_later_flip_still_caught(tmp_path, monkeypatch):
    from elmm_ray import integrity

    monkeypatch.setenv("ELMM_RUN_CACHE", str(tmp_path / "node_cache"))
    monkeypatch.setattr(integrity, "QUIESCENT_S", -1.0)  # parts count as settled at once
    checksums = _hand_written_store(tmp_path / "store")
    hashed = _count_hashing(monkeypatch)
    F.FeatureStore.open(tmp_path / "store").features_for(range(6))
    assert len(hashed) == len(checksums)
    F.FeatureStore.open(tmp_path / "store").features_for(range(6))  # another process
    assert len(hashed) == len(checksums)  # the node's markers: no second hashing
    monkeypatch.setenv("ELMM_VERIFY_PARTS", "every")  # the paranoid mode hashes every open
    F.FeatureStore.open(tmp_path / "store").features_for(range(6))
    assert len(hashed) == 2 * len(checksums)
    monkeypatch.delenv("ELMM_VERIFY_PARTS")
    monkeypatch.setattr(integrity.socket, "gethostname", lambda: "another-node")
    F.FeatureStore.open(tmp_path / "store").features_for(range(6))  # a shared cache dir
    assert len(hashed) == 3 * len(checksums)  # another node hashes for itself
    path = _part_file(tmp_path, checksums)
    st = os.stat(path)
    flip_byte(path, 0.9)  # in place, the mtime set back: the ctime still moves, a new key
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns and os.stat(path).st_size == st.st_size
    with pytest.raises(CorruptionError, match=rf"{path.name}"):
        F.FeatureStore.open(tmp_path / "store").features_for(range(6))


def test_no_marker_for_a_part_just_written_or_changed_while_hashed(tmp_path, monkeypatch):
    monkeypatch.setenv("ELMM_RUN_CACHE", str(tmp_path / "node_cache"))
    checksums = _hand_written_store(tmp_path / "store")  # written now: not yet quiescent
    hashed = _count_hashing(monkeypatch)
    for _ in range(2):
        F.FeatureStore.open(tmp_path / "store").features_for(range(6))
    assert len(hashed) == 2 * len(checksums)
    assert not (tmp_path / "node_cache" / "_verified").exists()
    from elmm_ray import integrity

    monkeypatch.setattr(integrity, "QUIESCENT_S", -1.0)
    hashed = _count_hashing(monkeypatch, also=os.utime)  # touched while being hashed
    F.FeatureStore.open(tmp_path / "store").features_for(range(6))
    assert not (tmp_path / "node_cache" / "_verified").exists()


def test_corrupt_index_and_metadata_are_named(tmp_path):
    _hand_written_store(tmp_path)
    flip_byte(tmp_path / F.INDEX, 0.3)
    with pytest.raises(CorruptionError, match=r"index\.parquet.*rebuilds the index"):
        F.FeatureStore.open(tmp_path).features_for([0])
    (tmp_path / F.METADATA).write_text('{"version": ')
    with pytest.raises(CorruptionError, match=r"metadata\.json is not valid JSON"):
        F.FeatureStore.open(tmp_path)


def test_corrupt_ray_checkpoint_is_refused_before_resume(tmp_path):
    run = tmp_path / "train"
    old, new = run / "checkpoint_2026-01-01_00-00-01.0", run / "checkpoint_2026-01-01_00-00-02.0"
    for ckpt in (old, new):
        (ckpt / "ckpt").mkdir(parents=True)
        for rank in (0, 1):
            (ckpt / "ckpt" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(os.urandom(999))
            (ckpt / f"rank{rank:04d}_state.pt").write_bytes(os.urandom(99))
    for ckpt in (old, new):
        record_checksums(ckpt, ["ckpt/zero_pp_rank_0_optim_states.pt", "rank0000_state.pt"],
                         name="checksums_rank0000.json")
        record_checkpoint(ckpt, 1)  # every file of the folder, like a rank's own tmp dir
    assert verify_resume(run) is None  # no run snapshot: a fresh run
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": new.name}}))
    assert verify_resume(run) == new
    flip_byte(new / "ckpt" / "zero_pp_rank_1_optim_states.pt")
    with pytest.raises(CorruptionError, match=rf"{new.name}/ckpt/zero_pp_rank_1.*delete the "
                                              rf"Ray Train run folder {run}"):
        verify_resume(run)


# --- environment faults: a real tmpfs (full, read-only) where this process may mount ------


@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): the disk-full and "
                    "read-only tests need root or a user namespace")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


@pytest.mark.slow
def test_disk_full_and_read_only_run_dir_then_rerun(tmp_path, capsys):
    """`elmm-ray synth` into a run directory on a 96 KiB tmpfs (disk full), then read-only:
    exit 2 with one line, no output marked complete; after the fix the rerun completes."""
    with _tmpfs(tmp_path / "mnt", "96k") as mnt:
        out = mnt / "data"
        args = ["synth", str(out), "num_entities=60", "max_images=2", "image_size=32"]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [line for line in err if line.startswith("error: ")] and any(
            "No space left on device" in line for line in err), err
        assert not (out / SYNTH_MANIFEST).exists()  # nothing claims to be complete
        _remount(mnt, "ro")
        assert main(args) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Read-only file system" in errors[0], err
        _remount(mnt, "rw,size=64m")
        assert main(args) == 0
        manifest = read_json(out / SYNTH_MANIFEST)
        assert manifest and not list(out.rglob("*.tmp")), "a temporary file was left behind"


# --- the tiny run end to end: each corruption named, the rerun repairs, same figures -----


def _cfg(run_dir: Path):
    return absolute_paths(load_config(REPO_ROOT / "configs" / "demo.yaml",
                                      [f"run_dir={run_dir}", *TINY, "train.epochs=2"]))


def _eval(cfg) -> dict:
    from elmm_ray.stages import run_stages

    results = run_stages(["eval"], cfg, show_progress=False)
    metrics = read_json(RunLayout.of(cfg).metrics_file(cfg.eval.split))["overall"]
    return {"metrics": metrics, "ran": sorted(n for n, r in results.items() if not r.skipped),
            "results": results}


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1200)
def test_tiny_run_detects_corruption_and_reruns_to_the_same_figures(tmp_path, ray_session,
                                                                     capsys):
    cfg = _cfg(tmp_path / "run")
    layout = RunLayout.of(cfg)
    clean = _eval(cfg)["metrics"]
    export = ["export", str(layout.root)]

    # 2. Trained weights: named at load; the train stage is due again; same figures.
    victim = layout.trained_model / "trainable.safetensors"
    flip_byte(victim)
    assert main(export) == 2
    assert f"corrupt file {victim}" in capsys.readouterr().err
    again = _eval(cfg)
    assert "train" in again["ran"] and "pack" not in again["ran"]
    assert again["metrics"] == clean

    # 3. A corrupt shard: named before the in-process encoder reads it; pack re-packs it.
    shard = sorted(layout.shard_dir.glob("shard-*.parquet"))[0]
    flip_byte(shard)
    layout.manifest_path("eval").unlink()  # something must read the shards again
    with pytest.raises(CorruptionError, match=rf"{shard.name}.*rerun `elmm-ray pack`"):
        _eval(cfg)
    again = _eval(cfg)
    assert {"pack", "train", "eval"} <= set(again["ran"])
    assert again["results"]["pack"].manifest["images_packed"] > 0
    assert again["metrics"] == clean

    # 4. The export: every file's digest checked at load; the stage reruns.
    assert main(export) == 0
    capsys.readouterr()
    from elmm_ray.export import load_export

    load_export(layout.export_dir)
    victim = layout.export_dir / "elmm.safetensors"
    flip_byte(victim)
    with pytest.raises(CorruptionError, match=r"elmm\.safetensors.*rerun `elmm-ray export`"):
        load_export(layout.export_dir)
    assert main(export) == 0
    load_export(layout.export_dir)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_corrupt_part_and_missing_store_rerun_extract_to_the_same_features(tmp_path,
                                                                           ray_session):
    """The extract stage (Ray Data): a flipped part is named by the reader and re-extracted
    alone; a deleted store under a complete run is rebuilt; a corrupt shard is named before
    extract reads it. The features after each repair equal the clean ones."""
    from elmm_ray.stages import run_stages

    cfg = _cfg(tmp_path / "run")
    layout = RunLayout.of(cfg)
    run_stages(["extract"], cfg, show_progress=False)
    store = Path(layout.feature_store)
    clean = F.FeatureStore.open(store).to_feature_bank()
    parts = sorted((store / F.PARTS).glob("part-*.npy"))
    rows = pq.read_table(store / F.PARTS / (parts[0].stem + F.FRAGMENT_SUFFIX)).num_rows
    flip_byte(parts[0], 0.9)
    with pytest.raises(CorruptionError, match=rf"corrupt feature-store part {parts[0]}"):
        F.FeatureStore.open(store).features_for(range(clean.features.shape[0]))
    extract = run_stages(["extract"], cfg, show_progress=False)["extract"]
    assert not extract.skipped and extract.manifest["images_this_run"] == rows
    repaired = F.FeatureStore.open(store).to_feature_bank()
    assert np.array_equal(repaired.features.numpy(), clean.features.numpy())

    # A missing store under a complete run, and a corrupt shard: extract names the shard
    # before it reads any; pack re-packs it; the rebuilt store equals the clean one.
    shutil.rmtree(store)
    shard = sorted(layout.shard_dir.glob("shard-*.parquet"))[0]
    flip_byte(shard)
    with pytest.raises(CorruptionError, match=rf"{shard.name}.*rerun `elmm-ray pack`"):
        run_stages(["extract"], cfg, show_progress=False)
    results = run_stages(["extract"], cfg, show_progress=False)
    assert not results["pack"].skipped and not results["extract"].skipped
    rebuilt = F.FeatureStore.open(store).to_feature_bank()
    assert np.array_equal(rebuilt.features.numpy(), clean.features.numpy())

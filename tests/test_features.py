"""Feature extraction with Ray Data and the feature store: exact features, random access,
accounting of bad/failed images, refusal of a mismatching store, reuse, kill-and-resume,
and the entity-table initialisation pass."""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from elmm_ray.config import load_config
from elmm_ray.data import extraction as X
from elmm_ray.data import feature_store as F
from elmm_ray.data.dataset import load_dataset
from elmm_ray.data.extraction import ExtractResult
from elmm_ray.data.feature_store import MANIFEST, FeatureStore, StoreLocation, expected_metadata
from elmm_ray.layout import RunLayout, absolute_paths
from elmm_ray.stages import run_stage

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_IMAGES = 3
TINY = [
    "dataset.synth.num_entities=40", "dataset.synth.max_images=4",
    "dataset.synth.image_size=32", "dataset.synth.inject_faults=true",
    "dataset.synth.no_image_fraction=0.1", f"images.max_images_per_entity={MAX_IMAGES}",
    "model.preset=tiny-test", "model.entity_repr=table", "model.patch_size=16",
    "mvtc.n_visual=4", "mvtc.n_text=4", "mvtc.heads=2",
    "ray.data_actors=2", "ray.data_batch_size=8", "ray.num_cpus=2",
]


def ray_test(fn):
    """A test on the shared Ray session: slow, ray, and a timeout (a bad CPU request hangs)."""
    return pytest.mark.slow(pytest.mark.ray(pytest.mark.timeout(300)(fn)))


def _packed_rows(shard_dir: Path) -> list[dict]:
    rows = []
    for f in sorted(shard_dir.glob("shard-*.parquet")):
        rows += pq.read_table(f, columns=["entity", "image_index", "image"]).to_pylist()
    return sorted(rows, key=lambda r: (r["entity"], r["image_index"]))


def _corrupt_one_image(shard_dir: Path) -> tuple[int, int]:
    """Garble the bytes of one selected image in its shard (a decode failure at extract)."""
    counts: dict[int, int] = {}
    for r in _packed_rows(shard_dir):
        counts[r["entity"]] = counts.get(r["entity"], 0) + 1
    victim = min(e for e, n in counts.items() if n >= 2)
    for f in sorted(shard_dir.glob("shard-*.parquet")):
        table = pq.read_table(f)
        data = table.to_pydict()
        hits = [i for i, (e, k) in enumerate(zip(data["entity"], data["image_index"]))
                if e == victim]
        if hits:
            first = min(hits, key=lambda i: data["image_index"][i])
            data["image"][first] = b"\x89PNG garbage, not an image"
            pq.write_table(type(table).from_pydict(data, schema=table.schema), f)
            _rerecord_shard(f)  # an image that pack accepted and extract cannot decode
            return victim, data["image_index"][first]
    raise AssertionError("no image to corrupt")


def _rerecord_shard(path: Path) -> None:
    """Record a rewritten shard's size and sha256 in its sidecar and the pack manifest (as if
    pack had written it so), so that the readers' digest check accepts it."""
    from elmm_ray.integrity import file_record

    record = file_record(path)
    for meta in (path.with_suffix(".json"), path.parent / "manifest.json"):
        data = json.loads(meta.read_text())
        for entry in [data, *data.get("shards", [])]:
            if entry.get("file") == path.name:
                entry.update(record)
        meta.write_text(json.dumps(data))


KILLER = """
import json, os, signal, sys
import ray
ray.init(address=sys.argv[1], _node_ip_address="127.0.0.1", logging_level="ERROR",
         log_to_driver=False)
from elmm_ray.data.extraction import extract_features
def on_part(summary):
    os.kill(os.getpid(), signal.SIGKILL)  # the driver dies right after a committed part
extract_features(**json.loads(sys.argv[2]), on_part=on_part, show_progress=False)
sys.exit(3)
"""


def _committed_keys(store: Path) -> list[tuple[int, int]]:
    keys = []
    for f in sorted((store / "parts").glob("part-*.index.parquet")):
        t = pq.read_table(f)
        keys += list(zip(t["entity"].to_pylist(), t["image_index"].to_pylist()))
    return keys


def _killed_extraction(cfg, tmp: Path) -> list[tuple[int, int]]:
    """Start the extraction in a driver subprocess (on the shared Ray session) that SIGKILLs
    itself right after its first committed part; the keys committed by then."""
    import ray

    layout = RunLayout.of(cfg)
    kwargs = {"shard_dir": str(layout.shard_dir), "store_dir": layout.feature_store,
              "backbone": str(layout.backbone),
              "max_images": MAX_IMAGES, "actors": 2, "batch_size": 4, "part_rows": 4}
    script = tmp / "killer.py"
    script.write_text(KILLER)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    address = "127.0.0.1:" + ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]
    proc = subprocess.run([sys.executable, str(script), address, json.dumps(kwargs)],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # Ray is killing the dead driver's tasks and actors: wait until nothing more commits.
    store = Path(kwargs["store_dir"])
    before = _committed_keys(store)
    for _ in range(20):
        time.sleep(0.5)
        now = _committed_keys(store)
        if now == before:
            break
        before = now
    assert not (store / "manifest.json").exists()
    return before


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, ray_session):
    """A small faulty synthetic KG, packed, one image garbled; extracted by a driver that is
    SIGKILLed after its first part, then by ``run_extract`` resuming that store."""
    from elmm_ray.train.context import backbone_source

    run_dir = tmp_path_factory.mktemp("run")
    cfg = absolute_paths(load_config(REPO_ROOT / "configs" / "demo.yaml",
                                     [f"run_dir={run_dir}", *TINY]))
    run_stage("synth", cfg)
    kg = load_dataset(cfg)
    layout = RunLayout.of(cfg)
    run_stage("pack", cfg, kg=kg, show_progress=False)
    corrupted = _corrupt_one_image(layout.shard_dir)
    backbone_source(cfg, kg, layout)
    committed_before = _killed_extraction(cfg, tmp_path_factory.mktemp("killer"))
    return cfg, kg, _extract(cfg, kg), corrupted, committed_before


def _extract(cfg, kg) -> ExtractResult:
    """The extract stage (upstream stages are complete or absent), as the store saw it."""
    stage = run_stage("extract", cfg, kg=kg, show_progress=False)
    store = stage.manifest["store"]
    return ExtractResult(store, StoreLocation(store).read_json(MANIFEST), stage.skipped)


@ray_test
def test_sigkilled_driver_resumes_without_duplicates(extracted):
    cfg, kg, result, _, before = extracted
    m, c = result.manifest, result.manifest["counts"]
    selected = c["done"] + c["failed"]
    assert 0 < len(before) < selected  # killed mid-run, after at least one part
    assert len(before) == len(set(before))
    assert not result.skipped
    assert m["images_this_run"] == selected - len(before)  # only what was not committed
    assert m["duplicates_dropped"] == 0
    keys = _committed_keys(Path(result.store_dir))
    assert len(keys) == len(set(keys)) == selected
    index = FeatureStore.open(result.store_dir).index_table()
    pairs = list(zip(index["entity"].to_pylist(), index["image_index"].to_pylist()))
    assert len(pairs) == len(set(pairs)) == c["done"]


@ray_test
def test_pipeline_features_equal_encode_images(extracted):
    from elmm_ray.models.backbone import (
        encode_images,
        load_backbone,
        preprocess_images,
        vision_tower_of,
    )

    cfg, kg, result, corrupted, _ = extracted
    tower = vision_tower_of(load_backbone(RunLayout.of(cfg).backbone))
    expected: dict[int, list[torch.Tensor]] = {}
    taken: dict[int, int] = {}
    for r in _packed_rows(RunLayout.of(cfg).shard_dir):
        e = r["entity"]
        taken[e] = taken.get(e, 0) + 1
        if taken[e] > MAX_IMAGES or (e, r["image_index"]) == corrupted:
            continue
        pixels = preprocess_images([Image.open(io.BytesIO(r["image"]))], cfg.model.image_size)
        expected.setdefault(e, []).append(encode_images(tower, pixels)[0].float())
    store = FeatureStore.open(result.store_dir)
    ids = torch.randperm(kg.num_entities, generator=torch.Generator().manual_seed(0))
    feats, mask = store.features_for(ids)
    assert feats.dtype == torch.float32 and mask.dtype == torch.bool
    assert feats.shape == (kg.num_entities, MAX_IMAGES, 4, 32)
    for i, e in enumerate(ids.tolist()):
        want = expected.get(e, [])
        assert mask[i].tolist() == [k < len(want) for k in range(MAX_IMAGES)]
        for k, w in enumerate(want):
            torch.testing.assert_close(feats[i, k], w, atol=4e-3, rtol=2e-3)
        assert not feats[i, len(want):].any()  # padding is zero


@ray_test
def test_every_image_is_counted_with_reasons(extracted):
    cfg, kg, result, corrupted, _ = extracted
    m, c = result.manifest, result.manifest["counts"]
    pack = json.loads((RunLayout.of(cfg).shard_dir / "manifest.json").read_text())
    assert c["done"] + c["skipped"] + c["failed"] == c["images_listed"] == pack["images_listed"]
    assert c["skipped_by_reason"]["bad at pack time"] == pack["images_bad"] > 0
    bad = {(b["entity_id"], b["image_index"]): b["reason"] for b in pack["bad_images"]}
    skipped = {(s["entity_id"], s["image_index"]): s["reason"] for s in m["skipped_images"]}
    for key, reason in bad.items():
        assert skipped[key] == f"bad at pack: {reason}"
    per_entity: dict[int, int] = {}
    for r in _packed_rows(RunLayout.of(cfg).shard_dir):
        per_entity[r["entity"]] = per_entity.get(r["entity"], 0) + 1
    beyond = sum(max(0, n - MAX_IMAGES) for n in per_entity.values())
    assert c["skipped_by_reason"][f"beyond max_images_per_entity ({MAX_IMAGES})"] == beyond > 0
    assert c["failed"] == 1
    failed = m["failed_images"][0]
    assert (failed["entity_id"], failed["image_index"]) == (kg.entities[corrupted[0]],
                                                           corrupted[1])
    assert "decode failed" in failed["reason"]
    stage = RunLayout.of(cfg).read_manifest("extract")
    assert stage["status"] == "complete" and stage["counts"] == c
    # Entities without any image get all-False masks.
    store = FeatureStore.open(result.store_dir)
    empty = [e for e in range(kg.num_entities) if e not in per_entity]
    assert empty and c["entities_without_features"] == len(empty)
    feats, mask = store.features_for(torch.tensor(empty))
    assert not mask.any() and not feats.any()


@ray_test
def test_store_random_access_pickle_and_uri(extracted):
    cfg, kg, result, *_ = extracted
    store = FeatureStore.open(result.store_dir)
    bank = store.to_feature_bank()
    assert store.num_entities == kg.num_entities and store.feature_shape == (4, 32)
    ids = torch.tensor([5, 3, 5, 0, kg.num_entities - 1, 17])
    feats, mask = store.features_for(ids)
    ref_feats, ref_mask = bank.features_for(ids)
    assert torch.equal(feats, ref_feats) and torch.equal(mask, ref_mask)
    reopened = pickle.loads(pickle.dumps(store))  # what a Ray Train worker receives
    assert reopened._index is None  # reopens lazily
    assert torch.equal(reopened.features_for(ids)[0], feats)
    remote = FeatureStore.open("file://" + result.store_dir)  # pyarrow.fs read_at path
    assert torch.equal(remote.features_for(ids)[0], feats)
    with pytest.raises(IndexError):
        store.features_for(torch.tensor([kg.num_entities]))


@ray_test
def test_mismatching_or_incomplete_store_is_refused(extracted, tmp_path):
    cfg, kg, result, *_ = extracted
    source = str(RunLayout.of(cfg).backbone)
    FeatureStore.open(result.store_dir, expect=expected_metadata(cfg, source))  # matches
    other = load_config(REPO_ROOT / "configs" / "demo.yaml",
                        [f"run_dir={cfg.run_dir}", *TINY, "model.feature_pool=2"])
    with pytest.raises(ValueError, match=r"pool: store has 1, the model config wants 2"):
        FeatureStore.open(result.store_dir, expect=expected_metadata(other, source))
    with pytest.raises(ValueError, match="weights_fingerprint"):
        FeatureStore.open(result.store_dir, expect={"weights_fingerprint": "st-other"})
    with pytest.raises(ValueError, match="max_images_per_entity: store has 3"):
        FeatureStore.open(result.store_dir, expect={"max_images_per_entity": 2})
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "metadata.json").write_text(Path(result.store_dir, "metadata.json").read_text())
    with pytest.raises(RuntimeError, match="incomplete"):
        FeatureStore.open(partial)


@ray_test
def test_complete_store_is_not_recomputed(extracted):
    cfg, kg, result, *_ = extracted
    parts = sorted(Path(result.store_dir, "parts").iterdir())
    stamps = [p.stat().st_mtime_ns for p in parts]
    start = time.perf_counter()
    again = _extract(cfg, kg)
    assert again.skipped and again.manifest == result.manifest
    assert time.perf_counter() - start < 20
    assert [p.stat().st_mtime_ns for p in sorted(Path(result.store_dir, "parts").iterdir())] \
        == stamps


@ray_test
def test_entity_init_equals_single_process(extracted):
    from safetensors.torch import load_file

    from elmm_ray.eval.evaluate import encode_all_entities
    from elmm_ray.train.context import build_context

    cfg, kg, result, *_ = extracted
    info = run_stage("entity_init", cfg, kg=kg, show_progress=False).manifest
    table = load_file(RunLayout.of(cfg).entity_init)["entity_table"]
    assert info["entities"] == kg.num_entities and table.shape[0] == kg.num_entities
    store = FeatureStore.open(result.store_dir)
    ctx = build_context(cfg, kg, features=store)
    ctx.model.eval()
    reference = encode_all_entities(ctx.model, ctx.collator, store, batch_size=16)
    torch.testing.assert_close(table, reference, atol=1e-5, rtol=1e-4)
    assert run_stage("entity_init", cfg, kg=kg).skipped


def test_store_reads_hand_written_parts(tmp_path):
    """The store alone (no Ray): parts written by the writer, random access, failed rows."""
    meta = {"version": F.STORE_VERSION, "num_entities": 6, "max_images_per_entity": 2,
            "tokens": 3, "width": 5, "fingerprint": "x"}
    loc = F.StoreLocation(tmp_path)
    loc.mkdir(F.PARTS)
    loc.write_json(F.METADATA, meta)
    rng = np.random.default_rng(0)
    values = {}
    batches = [[(4, 1), (0, 0), (4, 0)], [(0, 2), (2, 0), (4, 3), (0, 5)]]
    for batch in batches:
        feats = rng.standard_normal((len(batch), 3, 5)).astype(np.float16)
        errors = ["" if key != (2, 0) else "decode failed" for key in batch]
        X._write_part({"entity": np.array([e for e, _ in batch]),
                       "entity_id": np.array([f"E{e}" for e, _ in batch], dtype=object),
                       "image_index": np.array([k for _, k in batch]),
                       "error": np.array(errors, dtype=object), "features": feats},
                      store=str(tmp_path))
        values.update({key: f for key, f, err in zip(batch, feats, errors) if not err})
    store = FeatureStore.open(tmp_path, allow_incomplete=True)
    feats, mask = store.features_for([4, 2, 0, 1])
    assert mask.tolist() == [[True, True], [False, False], [True, True], [False, False]]
    # Slots follow image_index order; only the first max_images are served.
    for i, keys in enumerate([[(4, 0), (4, 1)], [], [(0, 0), (0, 2)], []]):
        for k, key in enumerate(keys):
            assert torch.equal(feats[i, k], torch.from_numpy(values[key].astype(np.float32)))
    assert not feats[1].any() and not feats[3].any()
    with pytest.raises(ValueError, match="tokens: store has 3"):
        FeatureStore.open(tmp_path, expect={"tokens": 4}, allow_incomplete=True)


def test_the_extraction_actor_loads_the_vision_tower_alone(tmp_path):
    """A sharded checkpoint: only the shards holding `vision_tower.` tensors are opened, the
    tower is the one inside the loaded LLaVA (same features, bit for bit)."""
    from elmm_ray.models.backbone import (
        build_tiny_llava,
        encode_images,
        load_backbone,
        load_vision_tower,
        vision_tower_of,
    )

    model = build_tiny_llava(
        vision_hidden=64, vision_layers=2, vision_heads=4, image_size=64, patch_size=16,
        llm_hidden=64, llm_layers=2, llm_heads=4, llm_kv_heads=2, llm_intermediate=128,
        vocab_size=300, image_token_id=5, pad_token_id=0, seed=0)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    files = F.vision_safetensors_files(str(tmp_path))
    assert files and len(files) < len(set(weight_map.values()))  # the LLM's shards stay shut
    tower = load_vision_tower(str(tmp_path), files)
    reference = vision_tower_of(load_backbone(tmp_path))
    pixels = torch.randn(3, 3, 64, 64)
    assert torch.equal(encode_images(tower, pixels), encode_images(reference, pixels))

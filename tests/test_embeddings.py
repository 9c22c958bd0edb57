"""Precomputed per-entity visual embeddings as a feature-store source: every file format
and shape into the store, the ids map, each bad input, and a tiny local training run that
reads the store (no images anywhere)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from elmm_ray.config import ConfigError, build_config, load_config
from elmm_ray.data.embeddings import EmbeddingsError, embeddings_to_store
from elmm_ray.data.feature_store import FeatureStore, embeddings_identity, expected_metadata
from elmm_ray.data.kg import load_kg
from elmm_ray.layout import RunLayout, absolute_paths
from tests.tiny import TINY_LOCAL_TRAIN, TINY_MODEL

FIXTURE = Path(__file__).parent / "data" / "mygo_db15k_tiny"
WIDTH = 24  # unlike the tiny-test tower's 32: the model must map it


@pytest.fixture(scope="module")
def kg():
    return load_kg(FIXTURE)


def _vectors(rows: int, *shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, *shape)).astype(np.float32)


def _save(path: Path, array: np.ndarray) -> Path:
    suffix = path.suffix
    if suffix == ".npy":
        np.save(path, array)
    elif suffix == ".npz":
        np.savez(path, visual=array)
    elif suffix == ".safetensors":
        save_file({"visual": array}, str(path))
    else:
        torch.save(torch.from_numpy(array), path)
    return path


def _store(tmp_path: Path, kg, path: Path, **kwargs) -> tuple[FeatureStore, dict]:
    manifest = embeddings_to_store(path, str(tmp_path / "store"), kg.entities, **kwargs)
    expect = embeddings_identity(str(path), kwargs.get("key"), kwargs.get("ids"),
                                 kwargs.get("axis", "images"), kwargs.get("max_images", 10))
    return FeatureStore.open(tmp_path / "store", expect=expect), manifest


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".safetensors", ".pt", ".pth"])
def test_each_format_into_the_store(tmp_path, kg, suffix):
    array = _vectors(kg.num_entities, WIDTH)
    array[[3, 7]] = 0.0  # releases fill entities without images with zeros
    store, manifest = _store(tmp_path, kg, _save(tmp_path / f"visual{suffix}", array))
    assert store.feature_shape == (1, WIDTH) and store.max_images == 1
    feats, mask = store.features_for(torch.arange(kg.num_entities))
    assert feats.shape == (kg.num_entities, 1, 1, WIDTH)
    expected = torch.from_numpy(array.astype(np.float16).astype(np.float32))
    torch.testing.assert_close(feats[:, 0, 0], expected, rtol=0, atol=0)
    assert mask[:, 0].tolist() == [i not in (3, 7) for i in range(kg.num_entities)]
    counts = manifest["counts"]
    assert (counts["entities_with_embeddings"], counts["entities_without_embeddings"],
            counts["zero_rows"], counts["vectors_stored"]) == (58, 2, 2, 58)


def test_images_and_tokens_axes(tmp_path, kg):
    array = _vectors(kg.num_entities, 3, WIDTH)
    array[0, 1] = 0.0  # entity 0 lacks its second image
    path = _save(tmp_path / "multi.npy", array)
    store, manifest = _store(tmp_path / "a", kg, path, axis="images", max_images=2)
    assert store.feature_shape == (1, WIDTH) and store.max_images == 2
    feats, mask = store.features_for(torch.tensor([0, 1]))
    assert mask.tolist() == [[True, False], [True, True]]
    torch.testing.assert_close(feats[1, :, 0], torch.from_numpy(array[1, :2]).half().float())
    assert manifest["counts"]["slots_beyond_max_images"] == kg.num_entities  # the 3rd of each
    store, _ = _store(tmp_path / "b", kg, path, axis="tokens")
    assert store.feature_shape == (3, WIDTH) and store.max_images == 1
    feats, mask = store.features_for(torch.tensor([0]))
    assert mask.tolist() == [[True]] and feats[0, 0, 1].abs().sum() == 0  # a zero token stays


def test_ids_map_rows_to_entities_and_counts_the_rest(tmp_path, kg):
    named = kg.entities[::-1][:50] + ["not-an-entity"]  # 10 entities get nothing
    (tmp_path / "ids.txt").write_text("".join(f"{n}\n" for n in named))
    array = _vectors(len(named), WIDTH)
    store, manifest = _store(tmp_path, kg, _save(tmp_path / "v.npy", array),
                             ids=str(tmp_path / "ids.txt"))
    feats, mask = store.features_for(torch.arange(kg.num_entities))
    last = kg.num_entities - 1
    torch.testing.assert_close(feats[last, 0, 0], torch.from_numpy(array[0]).half().float())
    assert int(mask.sum()) == 50 and not mask[:10].any()
    counts = manifest["counts"]
    assert (counts["rows_unmatched"], counts["entities_without_embeddings"]) == (1, 10)


def _pickle_object(path: Path) -> Path:
    torch.save({"visual": torch.zeros(2, 2), "meta": Path("x")}, path)  # not weights-only
    return path


@pytest.mark.parametrize("make,kwargs,expected", [
    (lambda p, n: _save(p / "a.npy", _vectors(n)), {}, r"a.npy: shape \[60\] is not"),
    (lambda p, n: _save(p / "a.npy", _vectors(n - 1, 4)), {},
     r"a.npy: 59 rows but the dataset has 60 entities; give the entity of each row"),
    (lambda p, n: _save(p / "a.npy", np.where(np.arange(n)[:, None] == 5, np.nan,
                                               _vectors(n, 4)).astype(np.float32)), {},
     r"a.npy: 1 row\(s\) hold NaN or inf \(first: row 5\)"),
    (lambda p, n: _save(p / "a.npy", np.ones((n, 4), dtype=np.int64)), {},
     r"a.npy: holds int64 values, not float vectors"),
    (lambda p, n: _save(p / "a.npy", np.full((n, 4), 1e6, dtype=np.float32)), {},
     r"a.npy: values beyond the fp16 range"),
    (lambda p, n: (p / "a.pkl").write_bytes(b"x") and p / "a.pkl", {},
     r"a.pkl: pickle files are never loaded"),
    (lambda p, n: _pickle_object(p / "a.pt"), {}, r"a.pt: torch.load\(weights_only=True\) "
     "refused it"),
    (lambda p, n: np.savez(p / "a.npz", x=_vectors(n, 4), y=_vectors(n, 4)) or p / "a.npz",
     {}, r"a.npz holds 2 arrays \(x, y\); name one with dataset.visual_embeddings.key"),
    (lambda p, n: np.savez(p / "a.npz", x=_vectors(n, 4)) or p / "a.npz", {"key": "z"},
     r"a.npz: no array named 'z'"),
    (lambda p, n: p / "missing.npy", {}, r"missing.npy does not exist"),
])
def test_bad_embedding_files_name_the_file(tmp_path, kg, make, kwargs, expected):
    path = make(tmp_path, kg.num_entities)
    with pytest.raises(EmbeddingsError, match=expected):
        embeddings_to_store(path, str(tmp_path / "store"), kg.entities, **kwargs)


def test_bad_ids_files(tmp_path, kg):
    path = _save(tmp_path / "v.npy", _vectors(3, 4))
    cases = [("a\nb\n", r"ids.txt names 2 entities but .*v.npy has 3 rows"),
             ("x\ny\nz\n", r"none of the 3 names in .*ids.txt is an entity"),
             ("1\n4\n1\n", r"ids.txt:3: '1' appears twice")]
    for text, expected in cases:
        (tmp_path / "ids.txt").write_text(text)
        with pytest.raises(EmbeddingsError, match=expected):
            embeddings_to_store(path, str(tmp_path / "s"), kg.entities,
                                ids=str(tmp_path / "ids.txt"))


def test_config_refuses_pickles_and_a_store_of_another_file(tmp_path, kg):
    with pytest.raises(ConfigError, match="is a pickle, which is never loaded"):
        build_config(overrides=["dataset.visual_embeddings.path=visual.pkl"])
    with pytest.raises(ConfigError, match="unknown file type '.h5'"):
        build_config(overrides=["dataset.visual_embeddings.path=visual.h5"])
    path = _save(tmp_path / "v.npy", _vectors(kg.num_entities, 4))
    embeddings_to_store(path, str(tmp_path / "store"), kg.entities)
    other = build_config(overrides=[f"dataset.visual_embeddings.path={tmp_path / 'w.npy'}",
                                    "images.max_images_per_entity=10"])
    with pytest.raises(ValueError, match="embeddings_file: store has .*v.npy"):
        FeatureStore.open(tmp_path / "store", expect=expected_metadata(other, source=""))


# ---------------------------------------------------------------------------- training


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tiny_training_run_reads_the_embeddings_store(tmp_path, kg):
    from elmm_ray.export import load_export
    from elmm_ray.stages import run_stages
    from elmm_ray.train.context import load_trained_context

    emb = _save(tmp_path / "DB15K-visual.pth", _vectors(kg.num_entities, WIDTH))
    cfg = absolute_paths(load_config("configs/demo.yaml", [
        f"run_dir={tmp_path / 'run'}", "dataset.name=db15k-tiny", f"dataset.path={FIXTURE}",
        f"dataset.visual_embeddings.path={emb}", *TINY_MODEL, *TINY_LOCAL_TRAIN,
        "train.epochs=1", "train.max_steps=4", "images.max_images_per_entity=2"]))
    results = run_stages(["eval", "export"], cfg, show_progress=False)
    assert list(results) == ["extract", "train", "eval", "export"]  # no synth, no pack
    extract = results["extract"].manifest
    assert extract["source"] == "embeddings"
    assert extract["counts"]["entities_with_embeddings"] == kg.num_entities
    assert results["train"].manifest["steps"] == 4
    assert results["eval"].manifest["num_queries"] > 0
    ctx = load_trained_context(cfg, kg)
    assert isinstance(ctx.features, FeatureStore)
    assert ctx.features.path == RunLayout.of(cfg).feature_store
    assert ctx.model.visual_input.in_features == WIDTH
    assert ctx.model.visual_input.out_features == 32  # the tiny-test tower's width
    trainable = json.loads((RunLayout.of(cfg).trained_model / "trainable.json").read_text())
    assert "visual_input.weight" in trainable["trainable"]
    # The export carries the features and the input map; it predicts like the run's model.
    exported = load_export(results["export"].manifest["out_dir"])
    assert exported.model.visual_input.in_features == WIDTH
    assert exported.features.feature_shape == (1, WIDTH)
    assert len(exported.predict([0], [0], k=3)[0]) == 3
    # A second run with the same config does no work.
    again = run_stages(["eval", "export"], cfg, show_progress=False)
    assert all(r.skipped for r in again.values())
    # The embedding file replaced at the same path (no config value changes): the store is
    # rebuilt from the new bytes.
    _save(emb, _vectors(kg.num_entities, WIDTH, seed=1))
    rebuilt = run_stages(["extract"], cfg, show_progress=False)["extract"]
    assert not rebuilt.skipped
    store = FeatureStore.open(RunLayout.of(cfg).feature_store)
    new = torch.from_numpy(_vectors(kg.num_entities, WIDTH, seed=1)[:3]).half().float()
    assert torch.allclose(store.features_for([0, 1, 2])[0][:, 0, 0], new)

"""The tower pre-training command (issue 22): settings, its own picture generator, a
deterministic run that saves a loadable tower with its card, and the committed tower."""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from elmm_ray.data import tower_images
from elmm_ray.models.tower_pretrain import PretrainSettings, pretrain_tower
from elmm_ray.models.towers import load_tower, pixel_spec

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMITTED = REPO_ROOT / "towers" / "elmm-tiny-clip"
TINY = PretrainSettings(steps=3, batch=8, probe_scenes=60, hidden=32, layers=1, heads=4,
                        image_size=32, patch_size=8, threads=1)


def test_settings_refuse_unknown_keys_and_bad_values():
    assert PretrainSettings.parse(["steps=7", "learning_rate=0.01"]).steps == 7
    with pytest.raises(ValueError, match="key one of seed, image_size"):
        PretrainSettings.parse(["stepz=7"])
    with pytest.raises(ValueError, match="steps='many': expected int"):
        PretrainSettings.parse(["steps=many"])
    with pytest.raises(ValueError, match="multiple of patch_size"):
        PretrainSettings.parse(["patch_size=7"])


def test_generator_is_seeded_and_draws_views_anew():
    def views(seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        scene = tower_images.sample_scene(rng)
        return [np.asarray(tower_images.render(rng, scene, 32)) for _ in range(2)]

    first, again = views(0), views(0)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(*first)  # two views of one scene differ
    tree = ast.parse(Path(tower_images.__file__).read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m and m.startswith("elmm_ray")]  # none of the KG's


def test_pretraining_saves_a_loadable_tower_deterministically(tmp_path):
    lines: list[str] = []
    first = pretrain_tower(tmp_path / "a", TINY, log=lines.append)
    second = pretrain_tower(tmp_path / "b", TINY, log=lambda _: None)
    assert first["sha256"] == second["sha256"]  # same seed, same machine, same threads
    out = tmp_path / "a"
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md",
                 "pretrain.json"):
        assert (out / name).is_file(), name
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert digest == first["sha256"] and digest in (out / "README.md").read_text()
    tower = load_tower(str(out))
    assert tower.config.model_type == "clip_vision_model"
    assert pixel_spec(str(out)).height == 32
    assert set(first["probes"]["layer -1"]) == {"hue", "shape", "count", "texture"}
    assert any(line.startswith("step 2/3") for line in lines)


@pytest.mark.skipif(not COMMITTED.is_dir(), reason="no committed tower")
def test_the_committed_tower_matches_its_card():
    weights = COMMITTED / "model.safetensors"
    record = json.loads((COMMITTED / "pretrain.json").read_text())
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert digest == record["sha256"] and digest in (COMMITTED / "README.md").read_text()
    assert weights.stat().st_size < 5 * 2**20  # a few MB at most
    tower = load_tower(str(COMMITTED))
    spec = pixel_spec(str(COMMITTED))
    assert (spec.height, spec.width) == (tower.config.image_size,) * 2


def test_the_demo_reads_the_committed_tower_from_any_directory(tmp_path, monkeypatch):
    """configs/demo.yaml's preset names the committed tower by where this source tree is, so
    `elmm-ray run /path/to/configs/demo.yaml` works from any directory; the tests' preset
    (tiny-test) keeps the random tower."""
    from elmm_ray.config import load_config

    monkeypatch.chdir(tmp_path)
    demo = load_config(REPO_ROOT / "configs" / "demo.yaml")
    assert demo.model.preset == "tiny-pretrained"
    assert Path(demo.model.vision_tower) == COMMITTED and demo.model.vision_feature_layer == -1
    tests = load_config(REPO_ROOT / "configs" / "demo.yaml", ["model.preset=tiny-test"])
    assert tests.model.vision_tower is None

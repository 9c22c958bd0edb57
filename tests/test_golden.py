"""Recorded loss curve of the first steps of the tiny local run (golden values).

The values were recorded with the training code as it stood before the one-loop refactor
(``train/local.py``) and must still come out of :func:`elmm_ray.train.loop.train_local`:
same model init, data order, negatives and LoRA dropout draws. A change here means the
training computation changed; re-record only when that is the intent, and say why.
The entity encoder's run (not recorded) must come out the same twice with one seed.
"""

from __future__ import annotations

import pytest

from elmm_ray.config import load_config
from elmm_ray.data.dataset import load_dataset
from elmm_ray.data.shards import pack_images
from elmm_ray.layout import RunLayout, absolute_paths
from elmm_ray.stages import run_stage
from elmm_ray.stages.train import evaluate
from elmm_ray.train.context import load_trained_context
from elmm_ray.train.loop import train_local
from tests.tiny import TINY as TINY_BASE

pytestmark = pytest.mark.timeout(300)

TINY = [*TINY_BASE, "train.epochs=6", "train.max_steps=12"]

GOLDEN_LOSSES = [
    4.688877105712891, 4.617593765258789, 3.4045748710632324, 3.269127607345581,
    3.4149169921875, 3.053920269012451, 3.1843206882476807, 3.024369716644287,
    2.877490997314453, 3.11568546295166, 3.3440299034118652, 2.981666088104248,
]


def test_first_steps_match_the_recorded_loss_curve(tmp_path):
    cfg = absolute_paths(load_config("configs/demo.yaml", [f"run_dir={tmp_path}", *TINY]))
    run_stage("synth", cfg, show_progress=False)
    kg = load_dataset(cfg)
    pack_images(kg, RunLayout.of(cfg).shard_dir, use_ray=False, show_progress=False)
    summary = train_local(cfg, kg, show_progress=False)
    assert summary["steps"] == len(GOLDEN_LOSSES)
    assert summary["losses"] == pytest.approx(GOLDEN_LOSSES, abs=1e-5)


def _encoder_run(run_dir) -> tuple[dict, dict]:
    cfg = absolute_paths(load_config("configs/demo.yaml", [
        f"run_dir={run_dir}", *TINY, "model.entity_repr=encoder", "train.hard_negatives=4",
        "train.entity_refresh_every=3", "train.eval_every=6"]))
    run_stage("synth", cfg, show_progress=False)
    kg = load_dataset(cfg)
    pack_images(kg, RunLayout.of(cfg).shard_dir, use_ray=False, show_progress=False)
    summary = train_local(cfg, kg, show_progress=False)
    return summary, evaluate(cfg, kg, load_trained_context(cfg, kg))


def test_same_seed_gives_identical_encoder_runs(tmp_path):
    """Determinism with everything the entity encoder adds (candidates encoded with
    gradients, the sharded cache, hard negatives mined against it, refreshes): two runs of
    one config give the same losses, validation curve and test metrics."""
    first, first_metrics = _encoder_run(tmp_path / "a")
    second, second_metrics = _encoder_run(tmp_path / "b")
    assert first["losses"] == second["losses"]
    assert [h["val_mrr"] for h in first["history"]] == [h["val_mrr"] for h in second["history"]]
    for direction in ("overall", "head", "tail"):
        for key, value in first_metrics[direction].items():
            assert second_metrics[direction][key] == pytest.approx(value, abs=1e-6), key

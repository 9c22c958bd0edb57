"""The stage runner: upstream stages first, complete stages skipped by fingerprint, a
changed key re-runs that stage and what is downstream, lost outputs are recomputed."""

from __future__ import annotations

import dataclasses

import pytest

from elmm_ray.config import load_config
from elmm_ray.layout import absolute_paths
from elmm_ray.stages import STAGES, plan, run_stages
from elmm_ray.stages.base import Stage, register


@pytest.fixture
def toy_stages():
    """Two toy stages: `toy_a` (reads `seed`) writes a.txt; `toy_b` (reads `eval`, needs
    toy_a) writes b.txt from it. Each counts its runs."""
    runs = {"toy_a": 0, "toy_b": 0}

    def run_a(ctx):
        runs["toy_a"] += 1
        ctx.layout.path("a.txt").write_text(f"a{ctx.cfg.seed}")
        return {"value": ctx.cfg.seed}

    def run_b(ctx):
        runs["toy_b"] += 1
        text = ctx.layout.path("a.txt").read_text() + f"-b{ctx.cfg.eval.batch_size}"
        ctx.layout.path("b.txt").write_text(text)
        return {"text": text}

    register(Stage("toy_a", ("seed",), lambda cfg: (), run_a,
                   lambda layout, cfg: layout.path("a.txt").is_file()))
    register(Stage("toy_b", ("eval",), lambda cfg: ("toy_a",), run_b,
                   lambda layout, cfg: layout.path("b.txt").is_file()))
    yield runs
    del STAGES["toy_a"], STAGES["toy_b"]


def test_upstream_first_skip_when_complete_rerun_what_changed(tmp_path, toy_stages):
    cfg = absolute_paths(load_config(None, [f"run_dir={tmp_path}"]))
    assert plan("toy_b", cfg) == ["toy_a", "toy_b"]
    results = run_stages(["toy_b"], cfg)
    assert toy_stages == {"toy_a": 1, "toy_b": 1}
    assert results["toy_b"].manifest["text"] == "a0-b256"
    again = run_stages(["toy_b"], cfg)
    assert all(r.skipped for r in again.values()) and toy_stages == {"toy_a": 1, "toy_b": 1}
    # a key only toy_b reads: toy_b alone runs again
    other = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, batch_size=8))
    run_stages(["toy_b"], other)
    assert toy_stages == {"toy_a": 1, "toy_b": 2}
    # a key toy_a reads: both run again
    seeded = dataclasses.replace(other, seed=3)
    assert run_stages(["toy_b"], seeded)["toy_b"].manifest["text"] == "a3-b8"
    assert toy_stages == {"toy_a": 2, "toy_b": 3}
    # toy_a's output lost: it runs again with the same fingerprint, and so does its consumer
    (tmp_path / "a.txt").unlink()
    results = run_stages(["toy_b"], seeded)
    assert not results["toy_a"].skipped and not results["toy_b"].skipped
    assert toy_stages == {"toy_a": 3, "toy_b": 4}


def test_a_stage_that_runs_again_says_which_keys_changed(tmp_path, toy_stages, capsys):
    """Never a silent restart: the console names the changed keys (or the changed inputs);
    the worker count and GPUs are not part of the training run's identity."""
    from elmm_ray.stages.base import stage_fingerprint

    cfg = absolute_paths(load_config(None, [f"run_dir={tmp_path}"]))
    run_stages(["toy_b"], cfg)
    capsys.readouterr()
    other = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, batch_size=8))
    run_stages(["toy_b"], other)
    out = capsys.readouterr().out
    assert "[toy_b] runs again: changed since its last run (eval.batch_size: 256 -> 8)" in out
    assert "[toy_a] complete" in out and "[toy_a] runs again" not in out
    run_stages(["toy_b"], dataclasses.replace(other, seed=3))
    out = capsys.readouterr().out
    assert "[toy_a] runs again: changed since its last run (seed: 0 -> 3)" in out
    assert "[toy_b] runs again: its inputs changed since its last run" in out
    demo = load_config("configs/demo.yaml")
    moved = dataclasses.replace(demo, train=dataclasses.replace(
        demo.train, num_workers=(1, 4), use_gpu=True, threads_per_worker=3))
    digests = {"extract": "x", "entity_init": "y", "pack": "z"}
    assert stage_fingerprint("train", demo, digests) == stage_fingerprint("train", moved, digests)
    longer = dataclasses.replace(demo, train=dataclasses.replace(demo.train, epochs=9))
    assert stage_fingerprint("train", demo, digests) != stage_fingerprint("train", longer,
                                                                          digests)


def test_every_pipeline_stage_is_registered_with_what_it_reads():
    cfg = load_config("configs/demo.yaml")
    # The demo's entity vectors are encodings (model.entity_repr=encoder): no entity table
    # to initialise; with the table the Ray workers read the entity_init stage.
    assert plan("export", cfg) == ["synth", "pack", "extract", "train", "eval", "export"]
    table = load_config("configs/demo.yaml", ["model.entity_repr=table"])
    assert plan("export", table) == ["synth", "pack", "extract", "entity_init", "train",
                                     "eval", "export"]
    local = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, backend="local"))
    assert plan("train", local) == ["synth", "pack", "train"]
    with pytest.raises(KeyError, match="unknown stage 'trian'"):
        plan("trian", cfg)


def test_a_stage_linked_from_a_shared_run_is_never_run(tmp_path, toy_stages):
    cfg = absolute_paths(load_config(None, [f"run_dir={tmp_path}"]))
    with pytest.raises(RuntimeError, match="stage toy_a should be complete"):
        run_stages(["toy_b"], cfg, must_be_complete=("toy_a",))
    assert toy_stages == {"toy_a": 0, "toy_b": 0}
    run_stages(["toy_a"], cfg)
    run_stages(["toy_b"], cfg, must_be_complete=("toy_a",))  # complete: fine
    assert toy_stages == {"toy_a": 1, "toy_b": 1}

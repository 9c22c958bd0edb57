"""Ray Tune sweeps: spaces fail fast, trials share upstream stages, ASHA stops weak trials,
the outputs (table, best configs, Pareto front) are written, a best config reruns, and a
sweep whose driver was SIGKILLed resumes with every trial run exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from elmm_ray.config import ConfigError, load_config
from elmm_ray.tune.pareto import best_row, dominates, pareto_front
from elmm_ray.tune.space import load_space
from elmm_ray.tune.sweep import split_stages, trial_backend
from tests.tiny import TINY as TINY_BASE

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"

# A tiny local-backend sweep: 60 entities, 3 epochs, validation every 16 steps.
TINY = [
    *TINY_BASE, "train.epochs=3", "train.eval_every=16", "train.val_max_queries=40",
    "tune.grace_period=1", "tune.latency_repeats=2", "ray.num_cpus=2",
]
# Grid order is fixed: a learning rate that learns, then three that cannot.
LR_SPACE = """search: grid
num_samples: 1
params:
  train.learning_rate: {type: choice, values: [0.003, 1.0e-8, 2.0e-8, 3.0e-8]}
"""


def test_pareto_front_on_a_hand_made_table():
    objectives = [("val_mrr", "max"), ("visual_tokens", "min"), ("latency_ms", "min")]
    rows = [
        {"val_mrr": 0.50, "visual_tokens": 64, "latency_ms": 10.0},  # 0: most accurate
        {"val_mrr": 0.40, "visual_tokens": 16, "latency_ms": 6.0},   # 1: cheap
        {"val_mrr": 0.40, "visual_tokens": 32, "latency_ms": 6.0},   # 2: dominated by 1
        {"val_mrr": 0.30, "visual_tokens": 16, "latency_ms": 7.0},   # 3: dominated by 1
        {"val_mrr": 0.20, "visual_tokens": 0, "latency_ms": 4.0},    # 4: no images, fastest
        {"val_mrr": 0.60, "visual_tokens": None, "latency_ms": None},  # 5: stopped early
    ]
    assert pareto_front(rows, objectives) == [0, 1, 4]
    assert dominates(rows[1], rows[2], objectives) and not dominates(rows[2], rows[1],
                                                                     objectives)
    assert not dominates(rows[0], rows[0], objectives)  # equal is not better
    assert best_row(rows, "val_mrr", "max") == 5 and best_row(rows, "visual_tokens", "min") == 4


def test_a_bad_space_fails_before_any_trial_listing_every_problem(tmp_path):
    space = tmp_path / "bad.yaml"
    space.write_text("""search: grid
serach: random
params:
  mvtc.n_visual: {type: choice, values: [4, -1]}
  train.lerning_rate: {type: uniform, low: 0.001, high: 0.01}
  model.dtype: {type: choice, values: [float32, float8]}
  train.num_negatives: {type: gaussian, mean: 3}
  seed: {type: choice, values: [1, 2]}
""")
    with pytest.raises(ConfigError) as err:
        load_space(space, load_config(DEMO))
    text = "\n".join(err.value.problems)
    assert "unknown key `serach`" in text
    assert "`params.mvtc.n_visual` value -1" in text and ">= 0" in text
    assert "train.lerning_rate" in text and "did you mean `train.learning_rate`" in text
    assert "float8" in text
    assert "`params.train.num_negatives`: give {type: one of" in text
    assert "`params.seed`: seed cannot be swept" in text
    grid = tmp_path / "grid.yaml"
    grid.write_text("search: grid\nparams:\n  train.learning_rate: "
                    "{type: loguniform, low: 0.001, high: 0.01}\n")
    with pytest.raises(ConfigError, match="search 'grid' needs `choice`"):
        load_space(grid, load_config(DEMO))


def test_every_shipped_space_loads_and_shares_upstream_stages():
    cfg = load_config(DEMO)
    splits = {}
    for path in sorted((REPO / "tune_spaces").glob("*.yaml")):
        space = load_space(path, cfg)
        splits[path.stem] = split_stages(space.apply(cfg), list(space.params))
    # features do not depend on MVTC counts; a pruning sweep starts from one trained base;
    # the demo encodes its entities (model.entity_repr=encoder): no entity_init stage
    assert splits["compression"] == (["synth", "pack", "extract"], ["train"])
    assert splits["pruning"] == (["synth", "pack", "extract", "train"], ["prune"])
    assert splits["contrastive"][1] == ["train"]
    assert splits["full"][1] == ["train", "prune"]
    # with the entity table, MVTC counts change the table's initial encodings
    table = load_config(DEMO, ["model.entity_repr=table"])
    space = load_space(REPO / "tune_spaces" / "compression.yaml", table)
    assert split_stages(space.apply(table), list(space.params)) == (
        ["synth", "pack", "extract"], ["entity_init", "train"])


def test_trials_of_one_cpu_worker_train_in_their_own_process_unless_told():
    def backend(*overrides, shared=None):
        return trial_backend(load_config(DEMO, list(overrides)), shared)

    assert backend("train.num_workers=1") == "local"  # auto: no Ray Train start-up
    assert backend("train.num_workers=2") == "ray"  # the demo's two workers
    assert backend("train.num_workers=[1, 2]") == "ray"  # elastic
    assert backend("train.num_workers=1", "train.use_gpu=true") == "ray"
    assert backend("train.num_workers=1", "tune.trial_backend=ray") == "ray"
    assert backend("train.backend=local", "train.num_workers=2") == "local"
    assert backend("train.num_workers=2", "tune.trial_backend=local") == "local"
    # a pruning sweep's base is shared: it keeps train.backend (and an existing base run)
    assert backend("train.num_workers=1", shared=["synth", "train"]) == "ray"
    with pytest.raises(ValueError, match="train.use_gpu is true"):
        backend("train.use_gpu=true", "tune.trial_backend=local")
    with pytest.raises(ConfigError, match="tune.trial_backend"):
        load_config(DEMO, ["tune.trial_backend=ray-train"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's VmHWM reset")
def test_a_reused_trial_actor_reports_each_trial_its_own_peak_memory():
    import numpy as np

    from elmm_ray.tune.sweep import reuse_trial_actors
    from elmm_ray.tune.trial import peak_rss_mb, reset_peak_rss

    assert reuse_trial_actors(load_config(DEMO, ["train.backend=local"]))
    assert not reuse_trial_actors(load_config(DEMO, ["train.backend=ray"]))  # Ray Train
    assert reset_peak_rss()
    before = peak_rss_mb()
    block = np.ones(400 * 2**20 // 8)  # an earlier trial's 400 MiB
    high = peak_rss_mb()
    del block
    assert high - before > 300
    assert reset_peak_rss()
    assert peak_rss_mb() < high - 300  # the next trial's peak starts from what is resident


@pytest.fixture(scope="module")
def lr_sweep(tmp_path_factory, ray_session):
    from elmm_ray.layout import absolute_paths
    from elmm_ray.tune.sweep import run_sweep

    root = tmp_path_factory.mktemp("sweep")
    space_file = root / "lr.yaml"
    space_file.write_text(LR_SPACE)
    # train.backend=ray on one CPU worker: tune.trial_backend=auto trains in the trials
    cfg = absolute_paths(load_config(DEMO, [f"run_dir={root / 'run'}", *TINY,
                                            "train.backend=ray", "train.num_workers=1"]))
    space = load_space(space_file, cfg)
    return cfg, space, run_sweep(cfg, space, show_progress=False)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_asha_stops_weak_trials_and_the_outputs_are_written(lr_sweep):
    cfg, space, result = lr_sweep
    # local trials compute the entity table in-process: no entity_init stage
    assert result.shared_stages == ["synth", "pack", "extract"]
    assert result.trial_stages == ["train"]
    status = {r["train.learning_rate"]: r["status"] for r in result.rows}
    assert status[0.003] == "done"
    assert list(status.values()).count("stopped") >= 1  # ASHA stopped a trial early
    done = [r for r in result.rows if r["status"] == "done"]
    assert all(r["visual_tokens"] == 8 and r["llm_params"] > 0 and r["latency_ms"] > 0
               for r in done)
    out = result.out_dir
    for name in ("results.csv", "results.parquet", "pareto.png", "best_val_mrr.yaml",
                 "experiment"):
        assert (out / name).exists(), name
    # trials linked the shared stages instead of recomputing them
    trial = out / "trials" / result.rows[0]["trial_id"]
    assert (trial / "features").is_symlink() and (trial / "shards").is_symlink()
    assert (trial / "train" / "model" / "trainable.json").is_file()
    assert not (trial / "train").is_symlink()
    # auto: the trials trained in the Tune actor, not on Ray Train, one after another in a
    # reused process (here all four in one); none failed to take over a stopped trial's actor
    assert all(not (out / "trials" / r["trial_id"] / "ray_train").exists() for r in result.rows)
    assert load_config(out / "best_val_mrr.yaml").train.backend == "local"
    assert "error" not in [r["status"] for r in result.rows]
    pids = [json.loads(f.read_text().splitlines()[-1])["pid"]
            for f in (out / "experiment").glob("*/result.json")]
    assert len(pids) == len(result.rows) and len(set(pids)) < len(pids), pids


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_the_best_config_reruns_to_its_validation_mrr(lr_sweep):
    from elmm_ray.stages import run_stages

    _, _, result = lr_sweep
    best = load_config(result.best["val_mrr"])
    row = next(r for r in result.rows if r["status"] == "done"
               and r["train.learning_rate"] == best.train.learning_rate)
    run_stages(["train"], best, show_progress=False)
    history = Path(best.run_dir, "train", "metrics.jsonl").read_text().splitlines()
    assert json.loads(history[-1])["val_mrr"] == pytest.approx(row["val_mrr"], abs=1e-6)


KILLER = """
import sys
from elmm_ray.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_killed_sweep_resumes_with_every_trial_exactly_once(tmp_path):
    """The driver (its own local Ray) is SIGKILLed once the first trial has finished; the
    same command then completes the sweep: every trial once, the finished one not rerun."""
    space = tmp_path / "lr.yaml"
    space.write_text(LR_SPACE)
    run_dir = tmp_path / "run"
    args = ["tune", str(DEMO), "--space", str(space), f"run_dir={run_dir}", *TINY]
    # Tune saves the experiment state every second, so a finished trial is on record.
    env = dict(os.environ, PYTHONPATH=str(REPO), TUNE_GLOBAL_CHECKPOINT_S="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", KILLER, *args], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    experiment = run_dir / "tune" / "experiment"
    deadline = time.time() + 400
    complete: list[Path] = []
    while time.time() < deadline and proc.poll() is None and not complete:
        complete = [p for p in experiment.glob("*/result.json")
                    if '"trial_complete": true' in p.read_text()]
        time.sleep(0.5)
    assert complete, "no trial finished before the deadline"
    time.sleep(3)  # its end is in the saved experiment state
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
    proc.wait()
    trial_id = json.loads(complete[0].read_text().splitlines()[-1])["trial_id"]
    first = run_dir / "tune" / "trials" / trial_id / "train" / "summary.json"
    stamp = first.stat().st_mtime_ns
    done = subprocess.run([sys.executable, "-c", KILLER, *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = (run_dir / "tune" / "results.csv").read_text().splitlines()[1:]
    ids = [r.split(",")[0] for r in rows]
    assert len(ids) == 4 and len(set(ids)) == 4
    assert first.stat().st_mtime_ns == stamp  # the finished trial was not trained again
    assert (run_dir / "tune" / "best_val_mrr.yaml").is_file()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_trials_train_on_ray_train_and_a_stopped_trial_frees_its_workers(tmp_path,
                                                                         ray_session):
    """tune.trial_backend=ray: every trial fits its own TorchTrainer, which reports each
    validation round to Tune; ASHA stops the second trial mid-training, and the third still
    gets the CPUs that the stopped trial's Train workers held (Ray Train's placement-group
    cleaner needs the dashboard's State API: see `ray.include_dashboard`)."""
    from elmm_ray.layout import absolute_paths
    from elmm_ray.tune.sweep import run_sweep

    space_file = tmp_path / "lr.yaml"
    space_file.write_text("search: grid\nnum_samples: 1\nparams:\n  train.learning_rate: "
                          "{type: choice, values: [0.003, 1.0e-8, 2.0e-8]}\n")
    cfg = absolute_paths(load_config(DEMO, [
        f"run_dir={tmp_path / 'run'}", *TINY, "train.backend=ray", "train.num_workers=1",
        "tune.trial_backend=ray", "train.cpus_per_worker=1", "train.eval_every=12"]))
    result = run_sweep(cfg, load_space(space_file, cfg), show_progress=False)
    status = [r["status"] for r in result.rows]
    assert status[0] == "done" and "stopped" in status[1:] and len(status) == 3
    for row in result.rows:  # each trial ran Ray Train (its own run under ray_train/)
        trial = result.out_dir / "trials" / row["trial_id"]
        assert list((trial / "ray_train").glob("train-*"))


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_pruning_sweep_prunes_copies_of_one_trained_base(tmp_path, ray_session):
    from elmm_ray.layout import absolute_paths
    from elmm_ray.tune.sweep import run_sweep

    space_file = tmp_path / "pruning.yaml"
    space_file.write_text("search: grid\nscheduler: none\nnum_samples: 1\n"
                          "objectives: [val_mrr:max, llm_params:min]\nparams:\n"
                          "  prune.ratio: {type: choice, values: [0.2, 0.5]}\n")
    cfg = absolute_paths(load_config(DEMO, [
        f"run_dir={tmp_path / 'run'}", *TINY, "prune.method=magnitude",
        "prune.finetune_steps=4", "prune.calib_samples=8", "train.max_steps=8"]))
    result = run_sweep(cfg, load_space(space_file, cfg), show_progress=False)
    assert result.shared_stages[-1] == "train" and result.trial_stages == ["prune"]
    trained = Path(cfg.run_dir) / "train" / "model" / "trainable.json"
    stamp = trained.stat().st_mtime_ns
    rows = {r["prune.ratio"]: r for r in result.rows}
    assert all(r["status"] == "done" for r in rows.values())
    assert rows[0.5]["llm_params"] < rows[0.2]["llm_params"]
    for row in rows.values():
        trial = result.out_dir / "trials" / row["trial_id"]
        assert (trial / "train").is_symlink()  # the one trained base, not retrained
        assert (trial / "prune" / "prune_report.json").is_file()
    assert trained.stat().st_mtime_ns == stamp

"""Unit tests of the training loop's parts that need no training run: the local engine's
schedule, the start-up profile of a Ray Train fit, the check that a Ray Train worker's
training queries are the driver's, and the removal of a killed worker's checkpoint dir."""

import numpy as np
import pytest


def test_the_schedule_counts_optimizer_steps_with_accumulation():
    """train.grad_accum > 1: the local engine steps the optimizer and the learning-rate
    schedule once per accumulation, as DeepSpeed does (the schedule's length is in optimizer
    steps on both engines)."""
    import torch

    from elmm_ray.config import build_config
    from elmm_ray.train.loop import TorchEngine

    cfg = build_config(overrides=["train.grad_accum=2", "train.warmup_steps=4",
                                  "train.learning_rate=0.01"])
    weight = torch.nn.Parameter(torch.ones(3))
    engine = TorchEngine([weight], cfg, steps=10)
    lrs, values = [], []
    for _ in range(6):  # 3 optimizer steps
        engine.backward((weight ** 2).sum())
        engine.step()
        lrs.append(engine.lr)
        values.append(weight.detach().clone())
    # warm-up of 4 optimizer steps: lr x 1/4 until the first optimizer step, then 2/4, ...
    assert lrs == pytest.approx([0.0025, 0.005, 0.005, 0.0075, 0.0075, 0.01])
    assert torch.equal(values[0], torch.ones(3))  # no step after the first micro-step
    assert not torch.equal(values[1], values[0]) and torch.equal(values[2], values[1])


def test_startup_phases_split_a_fit_and_tolerate_an_attempt_without_steps():
    """train_ray's profile of a fit from rank 0's marks: consecutive phases that add up to the
    time to the first step; an attempt resumed at its last step (no step) still profiles."""
    from elmm_ray.train.trainer import startup_phases

    marks = {"process": 103.0, "entered": 106.0, "imports": 107.5, "dataset": 107.6,
             "queries": 107.7, "model": 108.1, "engine": 110.0, "first_step": 110.5,
             "last_step": 130.0}
    phases = startup_phases(marks, fit_called=100.0, fit_returned=131.0)
    assert phases["to_worker_process"] == 3.0 and phases["worker_start"] == 3.0
    assert phases["engine"] == 1.9 and phases["first_step"] == 0.5
    assert phases["to_first_step"] == 10.5 and phases["after_last_step"] == 1.0
    assert phases["fixed"] == 11.0 and phases["fit"] == 31.0
    no_step = {k: v for k, v in marks.items() if k not in ("first_step", "last_step")}
    phases = startup_phases(no_step, fit_called=100.0, fit_returned=111.0)
    assert "to_first_step" not in phases and phases["fixed"] == 11.0
    assert startup_phases(None, 0.0, 1.0) == {}


def test_a_worker_whose_dataset_differs_from_the_drivers_refuses_to_train():
    """Ray Train workers take their training queries from the KG they load; the driver's
    digest of its own queries makes a node with another copy of the dataset an error that
    names the dataset, not a different objective."""
    from elmm_ray.config import build_config
    from elmm_ray.train.loop import check_queries, query_digest

    cfg = build_config(overrides=["dataset.path=/data/kg"])
    queries = np.array([[0, 1, 2], [2, 3, 0]], dtype=np.int64)
    digest = query_digest(queries)
    assert digest["rows"] == 2 and query_digest(queries.astype(np.int32)) == digest
    check_queries(queries, digest, 0, cfg)  # the same queries: nothing to say
    with pytest.raises(RuntimeError, match=r"rank 1 on .* read 1 training queries .* from "
                                           r"/data/kg, the driver read 2 "):
        check_queries(queries[:1], digest, 1, cfg)
    with pytest.raises(RuntimeError, match="every node must read the same dataset"):
        check_queries(queries[::-1], digest, 1, cfg)


def test_a_killed_workers_checkpoint_dir_is_removed_once_old(tmp_path):
    """A Ray Train worker killed while writing its checkpoint leaves ``elmm_ckpt_<pid>_*`` in
    the temp dir; the next worker on the node removes it when that process is gone and the
    directory is over an hour old, and nothing else: not a live process's, not a recent one,
    not another program's."""
    import os
    import subprocess
    import sys
    import time

    from elmm_ray.train.backends import CHECKPOINT_PREFIX, remove_stale_checkpoint_dirs

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(done.stdout)
    two_hours_ago = time.time() - 7200
    dirs = {name: tmp_path / name for name in (
        f"{CHECKPOINT_PREFIX}{dead}_old", f"{CHECKPOINT_PREFIX}{dead}_recent",
        f"{CHECKPOINT_PREFIX}{os.getpid()}_alive", f"{CHECKPOINT_PREFIX}abc_notapid",
        "other_123_dir")}
    for name, path in dirs.items():
        path.mkdir()
        (path / "weights.bin").write_bytes(b"0" * 10)
        if not name.endswith("recent"):
            os.utime(path, (two_hours_ago, two_hours_ago))
    removed = remove_stale_checkpoint_dirs(tmp_path)
    assert removed == [dirs[f"{CHECKPOINT_PREFIX}{dead}_old"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(dirs) - {removed[0].name})

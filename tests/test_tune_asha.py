"""A sweep resumed after its driver was killed: ASHA's rungs get back the results of the
trials the killed sweep had finished (``elmm_ray/tune/asha.py``; found by the fault matrix's
``tune-driver`` case, where the resumed sweep ran a trial to the end that the uninterrupted
one stopped)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.tune")

from pyarrow import fs  # noqa: E402
from ray.tune.experiment import Trial  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, TrialScheduler  # noqa: E402

from elmm_ray.tune.asha import ResumableASHA, recorded_results  # noqa: E402

# Validation MRR per report of the finished trial (as in the fault matrix's sweep).
FINISHED = [0.0696, 0.0983, 0.1234, 0.1045, 0.0923]


def _trial(tmp_path, trial_id: str, status: str):
    directory = tmp_path / trial_id
    directory.mkdir(parents=True)
    storage = SimpleNamespace(trial_fs_path=str(directory),
                              storage_filesystem=fs.LocalFileSystem())
    return SimpleNamespace(trial_id=trial_id, status=status, storage=storage)


def _resume(scheduler, tmp_path) -> list[str]:
    """Tune's restore: the finished trial added as TERMINATED, then the unfinished one,
    which reports its first two rounds again; the scheduler's decisions."""
    done = _trial(tmp_path, "done", Trial.TERMINATED)
    (tmp_path / "done" / "result.json").write_text("".join(
        json.dumps({"training_iteration": i + 1, "val_mrr": v}) + "\n"
        for i, v in enumerate(FINISHED)))
    again = _trial(tmp_path, "again", Trial.PENDING)
    scheduler.on_trial_add(None, done)
    scheduler.on_trial_add(None, again)
    return [scheduler.on_trial_result(None, again, {"training_iteration": i, "val_mrr": v})
            for i, v in ((1, 0.0936), (2, 0.0952))]


def test_a_resumed_asha_compares_with_the_trials_finished_before_the_crash(tmp_path):
    kwargs = dict(metric="val_mrr", mode="max", grace_period=2, reduction_factor=2,
                  max_t=10**6)
    got = _resume(ResumableASHA(**kwargs), tmp_path / "resumable")
    assert got == [TrialScheduler.CONTINUE, TrialScheduler.STOP]  # 0.0952 < 0.0983 at rung 2
    plain = _resume(ASHAScheduler(**kwargs), tmp_path / "plain")  # what Tune restored before
    assert plain == [TrialScheduler.CONTINUE, TrialScheduler.CONTINUE]


def test_recorded_results_of_a_trial_without_results_is_empty(tmp_path):
    assert recorded_results(_trial(tmp_path, "new", Trial.TERMINATED)) == []

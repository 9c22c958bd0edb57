"""ASHA for sweeps that resume: ``Tuner.restore`` brings back every trial but rebuilds the
scheduler as it was created (empty rungs), so a sweep resumed after its driver was killed
compared later trials with nothing and stopped different ones (found by the fault matrix:
a trial the uninterrupted sweep stops at its 2nd report ran to the end)."""

from __future__ import annotations

import json

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler

RESULT_FILE = "result.json"  # Tune's per-trial results, one JSON record a line


def recorded_results(trial: Trial) -> list[dict]:
    """Every result ``trial`` reported, from its ``result.json`` (local or object storage)."""
    storage = trial.storage
    path = f"{storage.trial_fs_path}/{RESULT_FILE}"
    try:
        with storage.storage_filesystem.open_input_stream(path) as stream:
            text = stream.readall().decode()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class ResumableASHA(ASHAScheduler):
    """:class:`ASHAScheduler` whose rungs get back, on a resumed sweep, the results of the
    trials the killed sweep had finished or stopped (Tune adds those as ``TERMINATED``)."""

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if trial.status != Trial.TERMINATED:
            return
        bracket = self._trial_info.pop(trial.trial_id)  # it will report nothing more
        for result in recorded_results(trial):
            if self._time_attr in result and self._metric in result:
                bracket.on_result(trial, result[self._time_attr],
                                  self._metric_op * result[self._metric])

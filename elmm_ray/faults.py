"""Seeded fault injection for the reliability tests and ``bench/bench_reliability.py``.

Off unless the environment variable ``ELMM_FAULT`` is set. ``ELMM_FAULT=POINT:N`` (several
separated by commas) makes the process that reaches the named point for the ``N``-th time
SIGKILL itself there: no cleanup, no ``finally``, as a crashed node. Occurrences are counted
per process, so a Ray worker counts its own. With ``ELMM_FAULT_DIR`` set, a fault that fires
first leaves ``<dir>/<POINT>.fired`` and never fires again while that file exists: the same
command, rerun with the same environment, completes (and a restarted worker does not die
twice). Ray workers of a local Ray started by the command inherit both variables.

Each point sits at a commit boundary of a stage (:data:`POINTS`); :func:`fault_point` is one
dictionary lookup when the variable is unset.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENV = "ELMM_FAULT"
DIR_ENV = "ELMM_FAULT_DIR"

POINTS: dict[str, str] = {
    "pack.shard": "Ray Data task: a shard's Parquet file is in place, its sidecar record not",
    "pack.manifest": "driver: every shard written, the pack manifest not",
    "extract.write": "Ray Data writer task: a feature part committed, not yet reported",
    "extract.part": "driver: after a committed part was counted, before the store manifest",
    "entity_init.save": "driver: the table written to its temporary file, not moved in place",
    "train.step": "training process (Ray Train worker or local): before an optimizer step",
    "train.checkpoint": "Ray Train worker: a validation round logged and the checkpoint "
                        "saved to a temporary directory, not yet reported to Ray Train",
    "eval.rank": "Ray eval worker: its slice ranked, not yet returned",
    "eval.metrics": "driver: every rank gathered, the metrics file not written",
    "prune.round": "driver: a pruning round fine-tuned, the pruned model not saved",
    "export.write": "export process: weights written, the completion marker not",
    "tune.trial": "Tune trial: its stages ran, the final report not sent",
}

_counts: dict[str, int] = {}
_parsed: tuple[str, dict[str, int]] | None = None


def parse(spec: str) -> dict[str, int]:
    """``"POINT:N,..."`` as ``{POINT: N}``; a clear error for an unknown point or a bad N."""
    faults: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, count = item.rpartition(":")
        if name not in POINTS:
            raise ValueError(f"{ENV}={spec!r}: unknown fault point {name or item!r}; points: "
                             f"{', '.join(POINTS)} (format POINT:N, N >= 1)")
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"{ENV}={spec!r}: {item!r} needs a count N >= 1 (POINT:N)")
        faults[name] = int(count)
    return faults


def fault_point(name: str) -> None:
    """Count one occurrence of point ``name`` in this process and SIGKILL the process when
    ``ELMM_FAULT`` asks for this occurrence (and ``ELMM_FAULT_DIR`` has not recorded it)."""
    global _parsed
    spec = os.environ.get(ENV)
    if not spec:
        return
    if name not in POINTS:
        raise KeyError(f"fault point {name!r} is not declared in elmm_ray.faults.POINTS")
    if _parsed is None or _parsed[0] != spec:
        _parsed = (spec, parse(spec))
    target = _parsed[1].get(name)
    if target is None:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] != target:
        return
    directory = os.environ.get(DIR_ENV)
    if directory:
        marker = Path(directory) / f"{name}.fired"
        marker.parent.mkdir(parents=True, exist_ok=True)
        try:  # exactly one process fires it, once
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, f"{name}:{target} pid {os.getpid()}\n".encode())
        os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)

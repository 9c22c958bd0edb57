"""Digests of Ray Train checkpoints: the rank that writes files into a checkpoint (rank 0,
the portable checkpoint of :mod:`elmm_ray.train.portable`) records them in
``checksums_rank<r>.json`` inside the checkpoint before it reports; a resume checks every
record before anything is loaded.

A corrupt latest checkpoint is an error naming it, not a silent fall-back: Ray Train V2
picks the checkpoint to resume from out of its own run snapshot
(``checkpoint_manager_snapshot.json``) and refuses ``resume_from_checkpoint``, so
resuming from an older one would mean editing Ray's private files. The way out is to
delete the Ray Train run's folder, which restarts training from step 0 (a fresh run of
the same config gives the same figures).
"""

from __future__ import annotations

import json
from pathlib import Path

from elmm_ray.integrity import CorruptionError, record_checksums, verify_checksums

SNAPSHOT = "checkpoint_manager_snapshot.json"


def _rank_record(rank: int) -> str:
    return f"checksums_rank{rank:04d}.json"


def record_checkpoint(directory: str | Path, rank: int) -> None:
    """Record size and sha256 of the files this rank wrote into ``directory``."""
    record_checksums(directory, name=_rank_record(rank))


def _way_out(run_dir: Path) -> str:
    return (f"delete the Ray Train run folder {run_dir} and rerun: training restarts from "
            "step 0 (Ray Train resumes only from the checkpoint its run snapshot names, so "
            "a corrupt one cannot be skipped)")


def verify_checkpoint(directory: str | Path, run_dir: str | Path | None = None) -> int:
    """Check every rank's recorded files in checkpoint ``directory``; returns how many files
    were checked. ``run_dir``: the Ray Train run folder named in the way out."""
    directory = Path(directory)
    way_out = _way_out(Path(run_dir) if run_dir else directory.parent)
    checked = 0
    for record in sorted(directory.glob("checksums_rank*.json")):
        checked += verify_checksums(directory, way_out, name=record.name)
    return checked


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint a resumed Ray Train run of ``run_dir`` starts from (the latest one of
    its run snapshot), or ``None`` for a run without one."""
    run_dir = Path(run_dir)
    snapshot = run_dir / SNAPSHOT
    if not snapshot.is_file():
        return None
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptionError(f"Ray Train's run snapshot {snapshot} is not valid JSON "
                              f"({err}); {_way_out(run_dir)}") from None
    name = latest.get("checkpoint_dir_name")
    return run_dir / name if name else None


def verify_resume(run_dir: str | Path) -> Path | None:
    """Before a Ray Train run of ``run_dir`` (re)starts: check the checkpoint it would resume
    from, so a corrupt one is a clear error on the driver. Returns that checkpoint."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return None
    if not latest.is_dir():
        raise CorruptionError(f"the latest checkpoint {latest} of Ray Train's run snapshot is "
                              f"missing; {_way_out(Path(run_dir))}")
    verify_checkpoint(latest, run_dir)
    return latest

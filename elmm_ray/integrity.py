"""Corruption is detected, never trusted: sha256 digests recorded when an output is written,
checked when it is read.

A folder of outputs (a trained model, a pruned model, an export, a Ray Train checkpoint)
gets a ``checksums.json`` beside its files (:func:`record_checksums`); readers call
:func:`verify_checksums` before they load anything. Single files whose digest lives in an
existing manifest (pack shards, feature-store parts) use :func:`verify_file`.

A mismatch raises :class:`CorruptionError` (a ``ValueError``: the CLI prints it on one
line and exits 2) naming the file, the expected and found size/digest and the way out.
With ``quarantine=True`` the bad file is first moved aside to ``<name>.corrupt``, so the
owning stage's ``outputs_exist`` check (:func:`intact`: every recorded file present at
its recorded size) fails and the stage's next run recomputes it. A folder written before
digests were recorded (no ``checksums.json``) is read as it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from elmm_ray.layout import write_json_atomic
from elmm_ray.remote import cache_root

log = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"
CORRUPT_SUFFIX = ".corrupt"
QUIESCENT_S = 5.0  # a file this much older than its check may be trusted by a marker
_CHUNK = 1 << 20


class CorruptionError(ValueError):
    """An output does not match the digest recorded when it was written (or is unreadable)."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    with open(path, "rb") as f:
        return sha256_stream(f)


def sha256_stream(f: Any) -> str:
    """Hex sha256 of what is left to read of the binary file object ``f``."""
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(_CHUNK), b""):
        h.update(chunk)
    return h.hexdigest()


def verified_sha256(path: str | os.PathLike, expected: str) -> bool:
    """Whether ``path`` hashes to ``expected``, hashed once per node and file version.

    A match leaves an empty marker in ``<cache_root>/_verified``, named by a digest of this
    host's name, the real path, and the device, inode, size, mtime and ctime of the file
    (``os.fstat`` of the descriptor that was hashed, taken before and after: a file that
    changed while it was hashed gets no marker), and ``expected``. The node's other
    processes then trust the part without hashing it. A rewrite, a rename over it or a
    ``touch`` changes the key (ctime cannot be set back), so a part corrupted by any write
    is hashed again and caught; corruption that changes no metadata (bit rot under the file
    system) is caught only with ``ELMM_VERIFY_PARTS=every`` (hash on every open). The host
    name keeps the markers per node when ``ELMM_RUN_CACHE`` or ``$HOME`` is shared over NFS.
    A file whose mtime or ctime is less than ``QUIESCENT_S`` old gets no marker: a rewrite
    within a coarse timestamp granularity could otherwise keep its key. Creating the
    marker is idempotent (concurrent processes may both hash, and both create it)."""
    with open(path, "rb") as f:
        before = os.fstat(f.fileno())
        if os.environ.get("ELMM_VERIFY_PARTS") != "every":
            marker = cache_root() / "_verified" / _marker_key(path, before, expected)
            if marker.is_file():
                return True
        else:
            marker = None
        found = sha256_stream(f)
        after = os.fstat(f.fileno())
    if found != expected:
        return False
    unchanged = _version(before) == _version(after)
    if marker is not None and unchanged and (
            time.time() - max(after.st_mtime, after.st_ctime) > QUIESCENT_S):
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError as err:  # a read-only cache: every process hashes, as before
            log.debug("no verification marker for %s: %s", path, err)
    return True


def _version(st: os.stat_result) -> tuple[int, ...]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _marker_key(path: str | os.PathLike, st: os.stat_result, expected: str) -> str:
    fields = (socket.gethostname(), os.path.realpath(path), *_version(st), expected)
    return hashlib.sha256("|".join(map(str, fields)).encode()).hexdigest()[:40]


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"bytes", "sha256"}`` of a file: what :func:`verify_file` compares against."""
    return {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}


class HashingWriter:
    """Passes writes through to ``stream`` while counting and hashing them (a digest
    without a second read of what was written)."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.sha, self.bytes = stream, hashlib.sha256(), 0

    def write(self, data: bytes) -> None:
        self.sha.update(data)
        self.bytes += len(data)
        self.stream.write(data)

    def record(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "sha256": self.sha.hexdigest()}


def _files_under(directory: Path, name: str) -> list[str]:
    out = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        hidden = any(part.startswith(".") for part in Path(rel).parts)
        if path.is_file() and not hidden and rel != name and not rel.endswith(CORRUPT_SUFFIX):
            out.append(rel)
    return out


def record_checksums(directory: str | os.PathLike, files: Iterable[str] | None = None, *,
                     name: str = CHECKSUMS) -> Path:
    """Write ``<directory>/<name>``: size and sha256 of ``files`` (relative paths; default:
    every file below ``directory`` except hidden ones). Written atomically, last."""
    directory = Path(directory)
    rels = list(files) if files is not None else _files_under(directory, name)
    records = {rel: file_record(directory / rel) for rel in rels}
    return write_json_atomic(directory / name, {"algorithm": "sha256", "files": records})


def read_checksums(directory: str | os.PathLike, *, name: str = CHECKSUMS,
                   way_out: str = "") -> dict[str, dict] | None:
    """The recorded ``{relative path: {"bytes", "sha256"}}`` of ``directory``; ``None`` when
    it records none (written before digests were kept)."""
    path = Path(directory) / name
    if not path.is_file():
        return None
    return dict(read_json_checked(path, way_out)["files"])


def read_json_checked(path: str | os.PathLike, way_out: str) -> Any:
    """JSON of ``path``; a truncated or garbled file is a :class:`CorruptionError` naming it."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptionError(f"{path} is not valid JSON (truncated or corrupt: {err}); "
                              f"{way_out}") from None


def quarantine(path: str | os.PathLike) -> Path:
    """Move a bad file aside to ``<path>.corrupt`` (kept for inspection, never read)."""
    path = Path(path)
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    os.replace(path, target)
    return target


def verify_file(path: str | os.PathLike, expected: dict, way_out: str, *,
                quarantine_bad: bool = False, full: bool = True) -> None:
    """Raise :class:`CorruptionError` unless ``path`` has the recorded ``bytes`` (and, with
    ``full``, ``sha256``). ``quarantine_bad``: move a bad file aside first."""
    path = Path(path)
    if not path.is_file():
        raise CorruptionError(f"{path} is missing (recorded at write time); {way_out}")
    size = path.stat().st_size
    problem = ""
    if "bytes" in expected and size != int(expected["bytes"]):
        problem = f"size {size} bytes, recorded {expected['bytes']} (truncated?)"
    elif full and expected.get("sha256"):
        found = sha256_file(path)
        if found != expected["sha256"]:
            problem = (f"sha256 {found[:16]}..., recorded {expected['sha256'][:16]}... "
                       "(flipped bytes)")
    if not problem:
        return
    moved = ""
    if quarantine_bad:
        moved = f" (moved aside to {quarantine(path).name})"
    raise CorruptionError(f"corrupt file {path}: {problem}{moved}; {way_out}")


def verify_checksums(directory: str | os.PathLike, way_out: str, *, name: str = CHECKSUMS,
                     quarantine_bad: bool = False) -> int:
    """Check every file recorded in ``<directory>/<name>``; returns how many were checked
    (0 when nothing was recorded)."""
    directory = Path(directory)
    records = read_checksums(directory, name=name, way_out=way_out)
    if records is None:
        log.debug("%s records no checksums (written before they were kept)", directory)
        return 0
    for rel, expected in records.items():
        verify_file(directory / rel, expected, way_out, quarantine_bad=quarantine_bad)
    return len(records)


def intact(directory: str | os.PathLike, *, name: str = CHECKSUMS) -> bool:
    """Cheap check (no hashing): the checksum record is readable and every file it lists is
    there with its recorded size. True for a folder without a record."""
    directory = Path(directory)
    try:
        records = read_checksums(directory, name=name)
    except (CorruptionError, OSError, KeyError, TypeError):
        return False
    if records is None:
        return True
    for rel, expected in records.items():
        path = directory / rel
        if not path.is_file() or path.stat().st_size != int(expected["bytes"]):
            return False
    return True

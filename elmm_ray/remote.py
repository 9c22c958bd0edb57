"""Run directories on object storage (``run_dir: s3://bucket/prefix`` or ``gs://...``).

Every stage reads and writes files in a local directory; with a remote run directory that
directory is a *mirror* of the remote prefix on this node's disk
(``$ELMM_RUN_CACHE/<scheme>/<bucket>/<prefix>``, default ``~/.cache/elmm_ray/runs``).
:class:`RemoteMirror` keeps the two in step through ``pyarrow.fs``:

- ``pull()`` before a command (and on a Ray worker whose node lacks the files) brings every
  remote file that is missing or differs in size, and removes local files that were synced
  before and are gone remotely;
- ``push()`` after each stage uploads what changed since the last push (size or mtime),
  deletes remotely what was deleted locally, and uploads ``manifests/`` last, so a stage
  counts as complete remotely only once its outputs are there.

The feature store and Ray Train's checkpoints do not go through the mirror: they live at
``<run_dir>/features`` and ``<run_dir>/ray_train`` on the object store itself and are read
and written there by every worker. An S3-compatible server (MinIO, Ceph, moto) is reached
through the ``storage_endpoint`` key (or ``AWS_ENDPOINT_URL``); credentials come from each
node's environment and are never written anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

log = logging.getLogger(__name__)

# Schemes a run directory may use, as pyarrow.fs understands them.
SCHEMES = ("s3", "gs", "gcs")
# Top-level entries of a run directory that live on the object store, not in the mirror.
DIRECT = ("features", "ray_train")
STATE_FILE = ".elmm_sync.json"  # what the mirror last exchanged with the remote
MANIFESTS = "manifests"


def is_uri(location: str | os.PathLike | None) -> bool:
    return bool(location) and "://" in str(location)


def with_endpoint(uri: str, endpoint: str | None) -> str:
    """``uri`` with pyarrow's ``endpoint_override`` for an ``s3://`` location on an
    S3-compatible server (unchanged without an endpoint, for other schemes, or when the URI
    already names one)."""
    if not endpoint or not uri.startswith("s3://") or "endpoint_override=" in uri:
        return uri
    return uri + ("&" if "?" in uri else "?") + "endpoint_override=" + quote(endpoint, safe="")


def plain_uri(uri: str) -> str:
    """``uri`` without its query (what a user wrote, for messages and joins)."""
    return uri.split("?", 1)[0].rstrip("/")


def join_uri(uri: str, *parts: str) -> str:
    """``<uri>/<parts>`` keeping ``uri``'s query (e.g. the endpoint) at the end."""
    base, _, query = uri.partition("?")
    joined = posixpath.join(base.rstrip("/"), *parts)
    return f"{joined}?{query}" if query else joined


def open_uri(uri: str, endpoint: str | None = None) -> tuple[Any, str]:
    """The ``pyarrow.fs`` filesystem and path of ``uri``."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(with_endpoint(uri, endpoint))
    return fs, path.rstrip("/")


def cache_root() -> Path:
    """This node's cache of remote run directories: ``$ELMM_RUN_CACHE`` or
    ``~/.cache/elmm_ray/runs``."""
    base = os.environ.get("ELMM_RUN_CACHE") or Path.home() / ".cache" / "elmm_ray" / "runs"
    return Path(base).expanduser()


def copy_down(fs: Any, path: str, dest: Path, digest: Any = None) -> int:
    """Stream the remote file ``path`` to ``dest`` through a temporary name and a rename
    (``digest``, a hashlib object, sees every byte); returns the bytes written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    written = 0
    try:
        with os.fdopen(fd, "wb") as out, fs.open_input_stream(path) as src:
            while chunk := src.read(1 << 22):
                if digest is not None:
                    digest.update(chunk)
                written += out.write(chunk)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return written


def mirror_dir(uri: str) -> Path:
    """The local mirror of the remote run directory ``uri`` on this node."""
    scheme, _, rest = plain_uri(uri).partition("://")
    rest = rest.strip("/")
    if not rest or ".." in rest.split("/"):
        raise ValueError(f"run_dir {uri!r}: give a bucket and a prefix, e.g. s3://bucket/runs/x")
    return (cache_root() / scheme / rest).resolve()


def _synced(rel: str) -> bool:
    """Whether ``rel`` (relative to the run directory) goes through the mirror."""
    top = rel.split("/", 1)[0]
    name = rel.rsplit("/", 1)[-1]
    return top not in DIRECT and rel != STATE_FILE and not (
        name.startswith(".") and name.endswith(".tmp"))


class RemoteMirror:
    """A remote run directory and its local mirror (see the module docstring)."""

    def __init__(self, uri: str, endpoint: str | None = None,
                 local: str | Path | None = None) -> None:
        self.uri = plain_uri(uri)
        self.endpoint = endpoint
        self.local = Path(local) if local else mirror_dir(uri)
        self._fs = None
        self._root = ""

    def __repr__(self) -> str:
        return f"RemoteMirror({self.uri!r} <-> {str(self.local)!r})"

    @property
    def fs(self):
        if self._fs is None:
            self._fs, self._root = open_uri(self.uri, self.endpoint)
        return self._fs

    def remote_path(self, rel: str = "") -> str:
        self.fs  # noqa: B018  (opens the filesystem, which sets the root)
        return posixpath.join(self._root, rel) if rel else self._root

    # --- state --------------------------------------------------------------------------
    def _state(self) -> dict[str, list[int]]:
        """Relative path -> [local size, local mtime_ns, remote mtime_ns] at the last
        exchange."""
        try:
            return json.loads((self.local / STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def _save_state(self, state: dict) -> None:
        self.local.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.local, prefix=f"{STATE_FILE}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, sort_keys=True)
        os.replace(tmp, self.local / STATE_FILE)

    # --- listing ------------------------------------------------------------------------
    def remote_files(self, under: str = "") -> dict[str, tuple[int, int]]:
        """Relative path -> (size, mtime_ns) of every synced remote file (below ``under``)."""
        import pyarrow.fs as pafs

        root = self.remote_path()
        selector = pafs.FileSelector(self.remote_path(under), recursive=True,
                                     allow_not_found=True)
        files = {}
        for info in self.fs.get_file_info(selector):
            if info.type != pafs.FileType.File:
                continue
            rel = posixpath.relpath(info.path, root)
            if _synced(rel):
                files[rel] = (int(info.size), int(info.mtime_ns or 0))
        return files

    def local_files(self, under: str = "") -> dict[str, os.stat_result]:
        start = self.local / under if under else self.local
        files = {}
        if not start.exists():
            return files
        for path in sorted(start.rglob("*")):
            if path.is_file() and not path.is_symlink():
                rel = path.relative_to(self.local).as_posix()
                if _synced(rel):
                    files[rel] = path.stat()
        return files

    @staticmethod
    def _below(rel: str, under: str) -> bool:
        return not under or rel.startswith(f"{under.rstrip('/')}/")

    # --- transfers ----------------------------------------------------------------------
    def pull(self, under: str = "", skip: tuple[str, ...] = ()) -> dict[str, int]:
        """Bring the remote files (below ``under``, not below any of ``skip``) into the
        mirror: those missing here or changed remotely since the last exchange; local files
        synced before and deleted remotely since are removed (the remote is the truth).
        Returns counts."""
        remote = {rel: v for rel, v in self.remote_files(under).items()
                  if not any(self._below(rel, s) for s in skip)}
        state = self._state()
        local = self.local_files(under)
        fetched = removed = 0
        for rel, (size, mtime) in sorted(remote.items()):
            stat, known = local.get(rel), state.get(rel)
            # Object stores keep whole seconds: a manifest (a few small files, the ones that
            # decide what is complete) is always fetched, the rest when its size or time moved.
            if (stat is not None and known is not None and known[2] == mtime
                    and known[:2] == [stat.st_size, stat.st_mtime_ns] and size == stat.st_size
                    and not rel.startswith(f"{MANIFESTS}/")):
                continue  # unchanged on both sides since the last exchange
            self._download(rel)
            fetched += 1
            st = (self.local / rel).stat()
            state[rel] = [st.st_size, st.st_mtime_ns, mtime]
        for rel in [r for r in state if r not in remote and self._below(r, under)
                    and not any(self._below(r, s) for s in skip)]:
            (self.local / rel).unlink(missing_ok=True)
            del state[rel]
            removed += 1
        self._save_state(state)
        if fetched or removed:
            log.info("pulled %d file(s) of %s into %s (%d removed)", fetched, self.uri,
                     self.local, removed)
        return {"fetched": fetched, "removed": removed, "files": len(remote)}

    def push(self, under: str = "") -> dict[str, int]:
        """Upload what changed in the mirror (below ``under``) since the last exchange,
        manifests last; delete remotely what was deleted here. Returns counts."""
        state = self._state()
        local = self.local_files(under)
        changed = [rel for rel, st in local.items()
                   if (state.get(rel) or [None, None])[:2] != [st.st_size, st.st_mtime_ns]]
        changed.sort(key=lambda rel: (rel.startswith(f"{MANIFESTS}/"), rel))
        gone = [rel for rel in state if rel not in local and self._below(rel, under)]
        for rel in gone:  # deleted here (a stage replaced its outputs)
            try:
                self.fs.delete_file(self.remote_path(rel))
            except FileNotFoundError:
                pass
            del state[rel]
        for rel in changed:
            self._upload(rel)
        if changed:
            infos = self.fs.get_file_info([self.remote_path(rel) for rel in changed])
            for rel, info in zip(changed, infos, strict=True):
                st = local[rel]
                state[rel] = [st.st_size, st.st_mtime_ns, int(info.mtime_ns or 0)]
        self._save_state(state)
        if changed or gone:
            log.info("pushed %d file(s) to %s (%d deleted)", len(changed), self.uri, len(gone))
        return {"uploaded": len(changed), "deleted": len(gone)}

    def fetch(self, rel: str) -> Path:
        """One remote file into the mirror unless it is there (a worker's input)."""
        if not (self.local / rel).is_file():
            self._download(rel)
        return self.local / rel

    def upload(self, rel: str) -> None:
        """One file of the mirror to the remote now (a worker's output), recorded as
        exchanged (a concurrent writer of the record may drop the entry: the file is then
        fetched once more, never missed)."""
        self._upload(rel)
        st, info = (self.local / rel).stat(), self.fs.get_file_info(self.remote_path(rel))
        state = self._state()
        state[rel] = [st.st_size, st.st_mtime_ns, int(info.mtime_ns or 0)]
        self._save_state(state)

    def _download(self, rel: str) -> None:
        copy_down(self.fs, self.remote_path(rel), self.local / rel)

    def _upload(self, rel: str) -> None:
        # One PUT (or multipart upload) per object: readers see the old object or the new
        # one, never a part.
        with open(self.local / rel, "rb") as src, self.fs.open_output_stream(
                self.remote_path(rel)) as out:
            while chunk := src.read(1 << 22):
                out.write(chunk)

    def check_writable(self) -> None:
        """Fail early, naming the location, when the remote cannot be written from here."""
        import pyarrow

        probe = f".elmm_probe_{hashlib.sha1(str(self.local).encode()).hexdigest()[:8]}"
        try:
            self.fs.create_dir(self.remote_path(), recursive=True)
            with self.fs.open_output_stream(self.remote_path(probe)) as out:
                out.write(b"ok")
            self.fs.delete_file(self.remote_path(probe))
        except (OSError, pyarrow.ArrowException) as err:
            endpoint = self.endpoint or "AWS_ENDPOINT_URL / the provider's default"
            raise ConnectionError(
                f"run_dir {self.uri!r} cannot be written from this machine ({err}); check "
                "that the bucket exists, the credentials in the environment (e.g. "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS) "
                f"and the endpoint ({endpoint}: the `storage_endpoint` key)") from err


def cached_copy(fs: Any, path: str, size: int | None = None,
                sha256: str | None = None) -> Path | None:
    """A node-local copy of the immutable remote file ``path`` (a committed feature-store
    part), downloaded once and then memory-mapped by every process of the node, instead of
    one ranged read per row; ``None`` with ``ELMM_PART_CACHE=off``. Copies are named by
    content (the recorded sha256, else path and size), so a re-extracted part is fetched
    again; a copy is checked against ``size`` and ``sha256`` before it is used."""
    setting = os.environ.get("ELMM_PART_CACHE", "")
    if setting.lower() == "off":
        return None
    if size is None:
        size = int(fs.get_file_info(path).size)
    key = sha256 or hashlib.sha256(f"{path}:{size}".encode()).hexdigest()
    base = Path(setting).expanduser() if setting else cache_root()
    dest = base / "_parts" / f"{key[:32]}{posixpath.splitext(path)[1]}"
    if dest.is_file() and dest.stat().st_size == size:
        return dest
    digest = hashlib.sha256()
    staged = dest.with_name(f".{dest.name}.{os.getpid()}.staged")
    got = copy_down(fs, path, staged, digest)
    if got != size or (sha256 and digest.hexdigest() != sha256):
        staged.unlink(missing_ok=True)
        raise OSError(f"{path}: the download has {got} bytes / sha256 "
                      f"{digest.hexdigest()[:12]}..., the store's record says {size} / "
                      f"{(sha256 or '?')[:12]}...: the remote part changed or is corrupt")
    os.replace(staged, dest)  # another process of the node may win the race: same bytes
    return dest

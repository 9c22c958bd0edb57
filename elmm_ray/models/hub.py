"""A hub checkpoint is downloaded once per node, before the stages start, never by every actor
and worker racing into a shared ``HF_HOME``.

:func:`prefetch` downloads ``model.backbone`` (safetensors, configs, tokenizer files; never a
pickled ``*.bin``) with ``huggingface_hub.snapshot_download`` under a file lock in the HF cache
(``<HF_HUB_CACHE>/.locks/elmm_ray/``), at most once per process and node: a second process
of the node waits on the lock, then finds the files there. The driver runs it before a stage
starts and, when Ray is up with several nodes, in one small task per other alive node
(:func:`elmm_ray.train.context.prepare_backbone`; an ``HF_HOME`` shared over NFS makes the
later nodes' tasks a lock and a look-up). Actors and workers then load with
``local_files_only=True`` (:func:`local_first`): no request to the hub; a node that joined
later (autoscaling) fetches through the same lock on first use. A local checkpoint
directory, or the tiny backbone (saved in the run directory), has nothing to fetch.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
LOCK_TIMEOUT_S = 3 * 3600  # a 13B checkpoint over a slow link
_fetched: dict[str, str] = {}  # hub id -> snapshot directory, fetched by this process


def looks_like_local_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether ``name`` is fetched from the hub: not ``tiny``, not a path."""
    text = str(name)
    return (text != "tiny" and not Path(text).expanduser().exists()
            and not looks_like_local_path(text))


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def lock_path(name: str) -> Path:
    return _hub_cache() / ".locks" / "elmm_ray" / (re.sub(r"[^\w.-]", "--", name) + ".lock")


def _snapshot(name: str, trust_remote_code: bool) -> str:
    from huggingface_hub import snapshot_download

    patterns = ALLOW_PATTERNS + (["*.py"] if trust_remote_code else [])
    return snapshot_download(name, allow_patterns=patterns)


def prefetch(name: str, *, trust_remote_code: bool = False, refresh: bool = False,
             downloader: Callable[[str, bool], str] | None = None) -> str | None:
    """Fetch hub checkpoint ``name`` into this node's HF cache, once per node: under a file
    lock, and recorded beside the lock (``<lock>.done``: the snapshot directory), so the
    node's other processes wait for the one download, then read the record without asking
    the hub again. ``refresh``: ask the hub even so (the record's files went missing).
    Returns the snapshot directory; None for a local directory or ``tiny``.
    ``downloader(name, trust_remote_code)``: ``snapshot_download`` (a fake in the tests)."""
    from filelock import FileLock  # huggingface_hub's own lock library

    if not is_hub_id(name):
        return None
    if name in _fetched and not refresh:
        return _fetched[name]
    lock = lock_path(name)
    done = lock.with_name(lock.name + ".done")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock), timeout=LOCK_TIMEOUT_S):
        recorded = done.read_text().strip() if done.is_file() else ""
        if refresh or not recorded or not (Path(recorded) / "config.json").is_file():
            try:
                recorded = (downloader or _snapshot)(name, trust_remote_code)
            except Exception as err:  # noqa: BLE001 - one line with the way out
                why = str(err).splitlines()[0] if str(err) else ""
                offline = ("HF_HUB_OFFLINE is set, so only the cache is searched; "
                           if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else "")
                raise OSError(
                    f"could not fetch the checkpoint {name!r} into this node's HF cache "
                    f"({type(err).__name__}: {why}); {offline}download it first (`hf "
                    f"download {name}`), or save it to a directory and set model.backbone "
                    "to that path") from err
            tmp = done.with_name(f"{done.name}.{os.getpid()}.tmp")
            tmp.write_text(recorded)
            os.replace(tmp, done)
    _fetched[name] = recorded
    return recorded


def local_first(load: Callable[..., T], name: str, *args: Any, **kwargs: Any) -> T:
    """``load(name, *args, local_files_only=True, **kwargs)`` for a hub id: this node's
    cache only, no request to the hub. Files not there (a node that joined after
    the stage's fetch): :func:`prefetch` through the node's lock, then the same
    local load (``*.py`` files too when ``kwargs`` has ``trust_remote_code``). A local
    directory is loaded as it is."""
    if not is_hub_id(name):
        return load(name, *args, **kwargs)
    try:
        return load(name, *args, local_files_only=True, **kwargs)
    except OSError as err:
        if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
            raise
        log.warning("%s is not in this node's HF cache (%s); fetching it once for the node",
                    name, str(err).splitlines()[0] if str(err) else type(err).__name__)
    prefetch(name, trust_remote_code=bool(kwargs.get("trust_remote_code")), refresh=True)
    return load(name, *args, local_files_only=True, **kwargs)


def local_dir(name: str, *, trust_remote_code: bool = False) -> str:
    """The snapshot directory of hub id ``name`` in this node's cache (fetched through
    :func:`prefetch` when it is not there)."""
    from huggingface_hub import snapshot_download

    def find(repo: str, local_files_only: bool = False, trust_remote_code: bool = False
             ) -> str:
        patterns = ALLOW_PATTERNS + (["*.py"] if trust_remote_code else [])
        return snapshot_download(repo, allow_patterns=patterns,
                                 local_files_only=local_files_only)

    return local_first(find, name, trust_remote_code=trust_remote_code)

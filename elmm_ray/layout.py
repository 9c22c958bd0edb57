"""The run layout: every path of a run directory and the one fingerprint scheme.

A run directory holds the resolved ``config.yaml``, one manifest per stage under
``manifests/`` and each stage's outputs. :class:`RunLayout` is the only place that knows
where anything lives (dataset, image shards, feature store, tokenizer, backbone, entity
init, train, eval, prune, export, tune); every stage, worker and command asks it.

A stage is *complete* when its manifest says ``complete`` with the fingerprint the stage
would compute now: a hash of the config values the stage reads plus the fingerprints of
the stages it consumes (:func:`fingerprint`). Every skip/resume decision compares these.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from elmm_ray.config import Config, config_to_dict, dump_config
from elmm_ray.remote import RemoteMirror, is_uri, join_uri, mirror_dir, with_endpoint

log = logging.getLogger(__name__)

# Inside a training output folder (``train/``, ``prune/finetune_<k>/``): the trainable
# weights of the validation round with the highest val MRR, and that round's record.
BEST_SUBDIR = "best"
BEST_RECORD = "best.json"
# What Ray workers leave out of a remote run directory's mirror (see RunLayout.pull_inputs).
WORKER_SKIP = ("shards", "data/images")


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write JSON through a temporary file + rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def _absolute_if_local(path: str | None) -> str | None:
    """A path that exists here, made absolute; anything else (a hub id) as it is."""
    return _absolute(path) if path and Path(path).expanduser().exists() else path


def _absolute(path: str | None) -> str | None:
    if not path or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def absolute_paths(cfg: Config) -> Config:
    """The config with every local path made absolute (relative to this process's working
    directory), so that Ray workers, whose working directory differs, see the same files."""
    return dataclasses.replace(
        cfg, run_dir=_absolute(cfg.run_dir),
        dataset=dataclasses.replace(
            cfg.dataset, path=_absolute(cfg.dataset.path),
            image_root=_absolute(cfg.dataset.image_root),
            visual_embeddings=dataclasses.replace(
                cfg.dataset.visual_embeddings, path=_absolute(cfg.dataset.visual_embeddings.path),
                ids=_absolute(cfg.dataset.visual_embeddings.ids))),
        images=dataclasses.replace(cfg.images, shard_dir=_absolute(cfg.images.shard_dir),
                                   feature_store=_absolute(cfg.images.feature_store)),
        train=dataclasses.replace(cfg.train, storage_path=_absolute(cfg.train.storage_path)),
        model=dataclasses.replace(cfg.model, vision_tower=_absolute_if_local(
            cfg.model.vision_tower)),
    )


def config_values(cfg: Config, keys: Iterable[str]) -> dict[str, Any]:
    """The values of dotted ``keys`` (sections or single keys, e.g. ``model`` or
    ``train.seed``) as plain data."""
    data = config_to_dict(cfg)
    out = {}
    for key in keys:
        node: Any = data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"fingerprint key `{key}` is not a config key")
            node = node[part]
        out[key] = node
    return out


TOWER_FILES = ("config.json", "preprocessor_config.json")  # plus every *.safetensors


def tower_reference(source: str | None) -> str | None:
    """What identifies vision tower ``source`` (``model.vision_tower``) in stage fingerprints
    and composed backbones: a local directory by its contents (``sha256:`` of its config and
    weight files), so that the same tower in a moved checkout or in a Ray job's uploaded
    ``working_dir`` is the same tower; a hub id (or nothing) as it is."""
    if not source:
        return source
    path = Path(source).expanduser()
    if not path.is_dir():
        return source
    files = sorted([path / f for f in TOWER_FILES if (path / f).is_file()]
                   + list(path.glob("*.safetensors")))
    stats = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _directory_digest(str(path.resolve()), stats)


@functools.lru_cache(maxsize=16)
def _directory_digest(path: str, stats: tuple) -> str:
    """sha256 over the named files of ``path`` (``stats``: their names, sizes and times, the
    cache key: a changed file is hashed again)."""
    digest = hashlib.sha256()
    for name, _size, _mtime in stats:
        digest.update(name.encode() + b"\0")
        with open(Path(path, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def fingerprint_values(cfg: Config, keys: Iterable[str], exclude: Iterable[str] = ()) -> dict:
    """The config values at ``keys`` minus the dotted ``exclude`` keys (e.g. test hooks and
    worker counts, which do not change a result): what a stage's fingerprint hashes. A local
    ``model.vision_tower`` counts by its contents, not its path (:func:`tower_reference`)."""
    values = config_values(cfg, keys)
    for key in exclude:
        section, _, leaf = key.rpartition(".")
        if section in values and isinstance(values[section], dict):
            values[section] = {k: v for k, v in values[section].items() if k != leaf}
    if isinstance(values.get("model"), dict) and values["model"].get("vision_tower"):
        values["model"] = {**values["model"],
                           "vision_tower": tower_reference(values["model"]["vision_tower"])}
    if values.get("model.vision_tower"):
        values["model.vision_tower"] = tower_reference(values["model.vision_tower"])
    return values


def changed_keys(old: Mapping, new: Mapping, prefix: str = "") -> list[tuple[str, object, object]]:
    """``(dotted key, old value, new value)`` of every leaf that differs between two nested
    mappings of config values."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += changed_keys(a, b, f"{name}.")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True,
                                                                      default=str):
            out.append((name, a, b))
    return out


def fingerprint(cfg: Config, keys: Iterable[str], inputs: Mapping[str, str] | None = None,
                exclude: Iterable[str] = ()) -> str:
    """Hash of the config values at ``keys`` (minus the dotted ``exclude`` keys, e.g. test
    hooks that do not change a result) and the fingerprints of the stage's ``inputs``."""
    values = fingerprint_values(cfg, keys, exclude)
    blob = json.dumps({"config": values, "inputs": dict(sorted((inputs or {}).items()))},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class RunLayout:
    """Paths and manifests of one run directory. The paths are local: with a run directory
    on object storage (``remote``) they are those of its local mirror
    (:mod:`elmm_ray.remote`), except the feature store, which is a URI there."""

    def __init__(self, root: str | Path, *, dataset_dir: str | None = None,
                 shard_dir: str | None = None, feature_store: str | None = None,
                 remote: RemoteMirror | None = None, endpoint: str | None = None) -> None:
        self.remote = remote
        self.endpoint = endpoint
        self.root = remote.local if remote else Path(root).expanduser().resolve()
        self._dataset_dir = dataset_dir
        self._shard_dir = shard_dir
        self._feature_store = feature_store

    @classmethod
    def of(cls, cfg: Config) -> RunLayout:
        """The layout of ``cfg``: its run directory plus the locations it overrides."""
        remote = None
        if is_uri(cfg.run_dir):
            remote = RemoteMirror(cfg.run_dir, cfg.storage_endpoint, mirror_dir(cfg.run_dir))
        return cls(cfg.run_dir, dataset_dir=cfg.dataset.path or None,
                   shard_dir=cfg.images.shard_dir or None,
                   feature_store=cfg.images.feature_store or None, remote=remote,
                   endpoint=cfg.storage_endpoint)

    @property
    def location(self) -> str:
        """The run directory as the user named it (its URI when remote)."""
        return self.remote.uri if self.remote else str(self.root)

    def display(self, path: str | Path) -> str:
        """``path`` as the user knows it: inside a remote run directory's mirror, its URI."""
        if self.remote:
            try:
                return f"{self.remote.uri}/{Path(path).relative_to(self.root).as_posix()}"
            except ValueError:
                pass
        return str(path)

    def pull(self, under: str = "") -> None:
        """With a remote run directory: bring its files (below ``under``) into the mirror."""
        if self.remote:
            self.remote.pull(under)

    def pull_inputs(self) -> None:
        """On a Ray worker, with a remote run directory: what a model step reads (tokenizer,
        backbone, dataset texts, entity table, trained weights, manifests), not the image
        files and shards (large; only pack and shard-fed features read them, and fetch
        their own: :meth:`pull_shards`)."""
        if self.remote:
            self.remote.pull(skip=WORKER_SKIP)

    def pull_shards(self) -> None:
        """The image shards, when they are in the remote run directory."""
        if self.remote and self.shard_dir.is_relative_to(self.root):
            self.remote.pull(self.shard_dir.relative_to(self.root).as_posix())

    def push(self, under: str = "") -> None:
        """With a remote run directory: upload what changed in the mirror."""
        if self.remote:
            self.remote.push(under)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    # --- inputs shared by every stage ------------------------------------------------------
    @property
    def dataset_dir(self) -> Path:
        """``dataset.path``, or ``<run_dir>/data`` (where the synthetic set is generated)."""
        if self._dataset_dir:
            return Path(self._dataset_dir).expanduser().resolve()
        return self.path("data")

    @property
    def shard_dir(self) -> Path:
        if self._shard_dir:
            return Path(self._shard_dir).expanduser().resolve()
        return self.path("shards")

    @property
    def feature_store(self) -> str:
        """``images.feature_store`` (a local path or a cloud URI), else ``<run_dir>/features``
        (with a remote run directory: that URI, with ``storage_endpoint`` in its query)."""
        configured = self._feature_store
        if configured:
            return with_endpoint(configured, self.endpoint) if is_uri(configured) else str(
                Path(configured).expanduser().resolve())
        if self.remote:  # on the object store itself, next to the mirrored files
            return join_uri(with_endpoint(self.remote.uri, self.endpoint), "features")
        return str(self.path("features"))

    @property
    def config_file(self) -> Path:
        return self.path("config.yaml")

    @property
    def tokenizer(self) -> Path:
        return self.path("tokenizer")

    @property
    def backbone(self) -> Path:
        """Where the tiny backbone's random-init weights are saved once for every process."""
        return self.path("backbone")

    @property
    def entity_init(self) -> Path:
        return self.path("entity_init.safetensors")

    # --- stage outputs -----------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        return self.path(stage)

    @property
    def trained_model(self) -> Path:
        return self.path("train", "model")

    @property
    def best_model(self) -> Path:
        """The trainable weights of training's best validation round (``best.json`` inside)."""
        return self.path("train", BEST_SUBDIR)

    def finetune_dir(self, round_: int) -> Path:
        """Output folder of the fine-tuning after pruning round ``round_`` (1-based)."""
        return self.path("prune", f"finetune_{round_}")

    @property
    def ray_train_storage(self) -> Path:
        """Ray Train's default ``storage_path`` (checkpoints of every Ray Train run of this
        run) when ``train.storage_path`` is unset."""
        return self.path("ray_train")

    def metrics_file(self, split: str) -> Path:
        return self.path("eval", f"metrics_{split}.json")

    @property
    def pruned_model(self) -> Path:
        return self.path("prune", "model")

    @property
    def export_dir(self) -> Path:
        return self.path("export")

    @property
    def tune_dir(self) -> Path:
        return self.path("tune")

    # --- config and manifests ----------------------------------------------------------------
    def write_config(self, cfg: Config) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return dump_config(cfg, self.config_file)

    def manifest_path(self, stage: str) -> Path:
        return self.path("manifests", f"{stage}.json")

    def read_manifest(self, stage: str) -> dict | None:
        """The stage's manifest; ``None`` when there is none, or when it is not valid JSON
        (truncated, garbled): a warning says so and the stage counts as not complete, so
        its next run rewrites it."""
        p = self.manifest_path(stage)
        if not p.is_file():
            return None
        try:
            data = read_json(p)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            log.warning("manifest %s is unreadable (%s): stage %s counts as not complete "
                        "and reruns", p, err, stage)
            return None
        if not isinstance(data, dict):
            log.warning("manifest %s holds no JSON object: stage %s counts as not complete "
                        "and reruns", p, stage)
            return None
        return data

    def write_manifest(self, stage: str, data: dict) -> Path:
        return write_json_atomic(self.manifest_path(stage), {"stage": stage, **data})

    def is_complete(self, stage: str, digest: str) -> bool:
        m = self.read_manifest(stage)
        return bool(m and m.get("status") == "complete" and m.get("fingerprint") == digest)

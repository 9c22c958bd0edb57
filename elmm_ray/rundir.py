"""The run directory: resolved config, one manifest per stage, and each stage's outputs.

A stage whose manifest says ``complete`` with the same fingerprint (a hash of the inputs
and settings it depends on) is skipped on re-run; anything else is redone or resumed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from elmm_ray.config import Config, dump_config


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


class RunDir:
    """Paths and manifests of one run directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def manifest_path(self, stage: str) -> Path:
        return self.path("manifests", f"{stage}.json")

    def write_config(self, cfg: Config) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return dump_config(cfg, self.path("config.yaml"))

    def read_manifest(self, stage: str) -> dict | None:
        p = self.manifest_path(stage)
        return read_json(p) if p.is_file() else None

    def write_manifest(self, stage: str, data: dict) -> Path:
        return write_json_atomic(self.manifest_path(stage), {"stage": stage, **data})

    def is_complete(self, stage: str, fingerprint: str) -> bool:
        m = self.read_manifest(stage)
        return bool(m and m.get("status") == "complete" and m.get("fingerprint") == fingerprint)

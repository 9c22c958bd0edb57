"""Search spaces over config keys, read from ``tune_spaces/*.yaml``.

A space names config keys (``prune.ratio``) and a distribution for each; every sampled
value is checked against the schema when the space loads, so a typo fails before a
sweep starts. (The sweep runner that turns a space into Ray Tune distributions is not
written yet.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from elmm_ray.config import ConfigError, build_config

DISTRIBUTIONS = {
    "choice": ("values",),
    "uniform": ("low", "high"),
    "loguniform": ("low", "high"),
    "randint": ("low", "high"),
}


@dataclass
class SearchSpace:
    """A validated search space: distributions over config keys plus sweep settings."""

    params: dict[str, dict]
    metric: str = "val_mrr"
    mode: str = "max"
    num_samples: int = 8
    scheduler: str = "asha"
    search: str = "random"
    extra: dict = field(default_factory=dict)

    def sample_values(self) -> dict[str, list]:
        """Representative values of each parameter (the bounds or every choice)."""
        out = {}
        for key, spec in self.params.items():
            if spec["type"] == "choice":
                out[key] = list(spec["values"])
            elif spec["type"] == "randint":
                out[key] = [spec["low"], spec["high"] - 1]
            else:
                out[key] = [spec["low"], spec["high"]]
        return out


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a space file; raise :class:`ConfigError` listing every problem."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    problems: list[str] = []
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
        raise ConfigError([f"{path} needs a `params` mapping of config key -> distribution"])
    allowed_top = {"params", "metric", "mode", "num_samples", "scheduler", "search"}
    problems += [f"unknown key `{k}` (known: {sorted(allowed_top)})"
                 for k in data if k not in allowed_top]
    if data.get("mode", "max") not in ("max", "min"):
        problems.append(f"`mode` = {data['mode']!r}; choose 'max' or 'min'")
    if data.get("scheduler", "asha") not in ("asha", "fifo"):
        problems.append(f"`scheduler` = {data['scheduler']!r}; choose 'asha' or 'fifo'")
    if data.get("search", "random") not in ("random", "optuna"):
        problems.append(f"`search` = {data['search']!r}; choose 'random' or 'optuna'")
    params = data["params"]
    for key, spec in params.items():
        if not isinstance(spec, dict) or spec.get("type") not in DISTRIBUTIONS:
            problems.append(f"`params.{key}`: give {{type: one of {sorted(DISTRIBUTIONS)}, ...}}")
            continue
        missing = [a for a in DISTRIBUTIONS[spec["type"]] if a not in spec]
        if missing:
            problems.append(f"`params.{key}`: type {spec['type']} needs {missing}")
    if problems:
        raise ConfigError(problems, str(path))
    space = SearchSpace(params=params, **{k: v for k, v in data.items() if k != "params"})
    for key, values in space.sample_values().items():
        for value in values:
            try:
                build_config(overrides=[f"{key}={yaml.safe_dump(value).strip()}"])
            except ConfigError as err:
                problems += [f"`params.{key}` value {value!r}: {p}" for p in err.problems]
    if problems:
        raise ConfigError(problems, str(path))
    return space

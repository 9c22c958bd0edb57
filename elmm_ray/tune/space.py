"""Search spaces over config keys, read from ``tune_spaces/*.yaml``.

A space file holds ``params`` (config key -> distribution) and, optionally, any key of the
config's ``tune`` section (``search``, ``num_samples``, ``metric`` ...), which then
overrides the config. Every value a distribution can produce (each choice, both bounds) is
checked against the schema when the space loads, so a typo or an out-of-range value fails
before any trial starts, with every problem listed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from elmm_ray.config import (
    Config,
    ConfigError,
    TuneConfig,
    build_config,
    config_to_dict,
    key_info,
    read_yaml,
)

DISTRIBUTIONS = {
    "choice": ("values",),
    "uniform": ("low", "high"),
    "loguniform": ("low", "high"),
    "randint": ("low", "high"),
}


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space: distributions over config keys plus ``tune`` overrides."""

    params: dict[str, dict]
    tune: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def sample_values(self) -> dict[str, list]:
        """Representative values of each parameter (every choice, or the bounds)."""
        out = {}
        for key, spec in self.params.items():
            if spec["type"] == "choice":
                out[key] = list(spec["values"])
            elif spec["type"] == "randint":
                out[key] = [spec["low"], spec["high"] - 1]
            else:
                out[key] = [spec["low"], spec["high"]]
        return out

    def apply(self, cfg: Config) -> Config:
        """``cfg`` with the space's ``tune`` settings."""
        data = config_to_dict(cfg)
        data["tune"] = {**data["tune"], **self.tune}
        return build_config(data, source=self.source)

    def to_tune(self, grid: bool = False) -> dict[str, Any]:
        """Ray Tune's ``param_space`` (``grid``: every choice as a grid axis)."""
        from ray import tune

        space: dict[str, Any] = {}
        for key, spec in self.params.items():
            kind = spec["type"]
            if kind == "choice":
                space[key] = (tune.grid_search(list(spec["values"])) if grid
                              else tune.choice(list(spec["values"])))
            elif kind == "uniform":
                space[key] = tune.uniform(spec["low"], spec["high"])
            elif kind == "loguniform":
                space[key] = tune.loguniform(spec["low"], spec["high"])
            else:
                space[key] = tune.randint(spec["low"], spec["high"])
        return space


def _param_problems(key: str, spec: object) -> list[str]:
    """What is wrong with one ``params`` entry, before its values are checked."""
    if not isinstance(spec, dict) or spec.get("type") not in DISTRIBUTIONS:
        return [f"`params.{key}`: give {{type: one of {sorted(DISTRIBUTIONS)}, ...}}"]
    problems = []
    needed = DISTRIBUTIONS[spec["type"]]
    missing = [a for a in needed if a not in spec]
    unknown = [a for a in spec if a not in ("type", *needed)]
    if missing:
        problems.append(f"`params.{key}`: type {spec['type']} needs {missing}")
    if unknown:
        problems.append(f"`params.{key}`: unknown fields {unknown}")
    if spec["type"] == "choice" and not missing and (
            not isinstance(spec["values"], list) or not spec["values"]):
        problems.append(f"`params.{key}`: `values` must be a non-empty list")
    if key.startswith(("run_dir", "tune.", "ray.")) or key == "seed":
        problems.append(f"`params.{key}`: {key} cannot be swept")
    info = key_info(key)
    if info is not None and info.kind is int and spec["type"] in ("uniform", "loguniform"):
        problems.append(f"`params.{key}`: {key} is an integer; give `randint` or `choice`, "
                        f"not {spec['type']} (it samples fractions)")
    return problems


def load_space(path: str | Path, cfg: Config | None = None) -> SearchSpace:
    """Read and validate a space file (against ``cfg`` when given, so that combined
    settings are checked too); raise :class:`ConfigError` listing every problem."""
    path = Path(path)
    data = read_yaml(path, "search space")
    if not isinstance(data.get("params"), dict) or not data["params"]:
        raise ConfigError([f"{path} needs a non-empty `params` mapping of config key -> "
                           "distribution"])
    tune_keys = [f.name for f in dataclasses.fields(TuneConfig)]
    problems = [f"unknown key `{k}` (known: params, {', '.join(tune_keys)})"
                for k in data if k != "params" and k not in tune_keys]
    overrides = {k: v for k, v in data.items() if k in tune_keys}
    params = data["params"]
    well_formed = {}
    for key, spec in params.items():
        found = _param_problems(key, spec)
        problems += found
        if not found:
            well_formed[key] = spec
    space = SearchSpace(params=params, tune=overrides, source=str(path))
    base = config_to_dict(cfg) if cfg is not None else {}
    try:
        base["tune"] = {**base.get("tune", {}), **overrides}
        tuned = build_config(base)
    except ConfigError as err:
        problems += err.problems
        tuned = None
        base.pop("tune")  # reported once; the values below are checked without it
    checked = SearchSpace(params=well_formed)
    for key, values in checked.sample_values().items():
        for value in values:
            try:
                build_config(base, overrides=[f"{key}={yaml.safe_dump(value).strip()}"])
            except ConfigError as err:
                problems += [f"`params.{key}` value {value!r}: {p}" for p in err.problems]
    if tuned is not None and tuned.tune.search == "grid":
        problems += [f"`params.{key}`: search 'grid' needs `choice` distributions, not "
                     f"{spec['type']}" for key, spec in well_formed.items()
                     if spec["type"] != "choice"]
    if problems:
        raise ConfigError(problems, str(path))
    return space

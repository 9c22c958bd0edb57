"""Load a :class:`Config`: schema defaults <- YAML file <- ``key=value`` overrides.

Every problem (unknown key, wrong type, out-of-range value, fields that disagree) is
collected and raised together in one :class:`ConfigError`, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any

import yaml

from elmm_ray.config.schema import Config


class ConfigError(ValueError):
    """Every problem found in a configuration, one per line."""

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = list(problems)
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} configuration problem(s){where}:\n{lines}")


def _field_types(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _coerce(value: Any, default: Any) -> tuple[bool, Any]:
    """Return (ok, value) where value has the default's type when acceptable."""
    kind = type(default)
    if kind is bool:
        return (isinstance(value, bool), value)
    if kind is int:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, int):
            return True, value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return False, value
    if kind is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        return False, value
    if kind is str:
        if isinstance(value, str):
            return True, value
        if value is None:
            return True, ""
        return False, value
    if kind is list:
        return (isinstance(value, list), value)
    return True, value


def _type_name(default: Any) -> str:
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number",
            str: "a string", list: "a list"}.get(type(default), type(default).__name__)


def _check_rules(key: str, value: Any, f: dataclasses.Field) -> list[str]:
    md = f.metadata
    problems = []
    if "choices" in md and value not in md["choices"]:
        allowed = ", ".join(repr(c) for c in md["choices"])
        problems.append(f"`{key}` = {value!r} is not allowed; choose one of: {allowed}")
    bounds = [("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")]
    for name, ok, sym in bounds:
        if name in md and isinstance(value, (int, float)) and not ok(value, md[name]):
            problems.append(f"`{key}` = {value!r} is out of range; it must be {sym} {md[name]}")
    return problems


def _merge_into(obj: Any, data: dict, prefix: str, problems: list[str]) -> None:
    """Write ``data`` (nested dict) into the dataclass ``obj``, collecting problems."""
    fields = _field_types(type(obj))
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean `{prefix}{close[0]}`?" if close else ""
            known = ", ".join(sorted(fields))
            problems.append(f"unknown key `{full}`{hint} (known keys here: {known})")
            continue
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                problems.append(f"`{full}` is a section; give a mapping, not {value!r}")
                continue
            _merge_into(current, value, f"{full}.", problems)
            continue
        ok, coerced = _coerce(value, current)
        if not ok:
            expected = _type_name(current)
            problems.append(f"`{full}` = {value!r} has the wrong type; expected {expected}")
            continue
        setattr(obj, key, coerced)


def _check_all(obj: Any, prefix: str, problems: list[str]) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_all(value, f"{prefix}{f.name}.", problems)
        else:
            problems.extend(_check_rules(f"{prefix}{f.name}", value, f))


def _cross_checks(cfg: Config) -> list[str]:
    """Rules that involve more than one field."""
    p: list[str] = []
    s, m = cfg.dataset.synth, cfg.model
    if s.min_images > s.max_images:
        p.append(f"`dataset.synth.min_images` = {s.min_images} exceeds "
                 f"`dataset.synth.max_images` = {s.max_images}; lower one of them")
    if m.backbone == "tiny":
        if m.llm_hidden % m.llm_heads:
            p.append(f"`model.llm_hidden` = {m.llm_hidden} is not divisible by "
                     f"`model.llm_heads` = {m.llm_heads}")
        if m.llm_heads % m.llm_kv_heads:
            p.append(f"`model.llm_heads` = {m.llm_heads} is not divisible by "
                     f"`model.llm_kv_heads` = {m.llm_kv_heads}")
        if m.vision_hidden % m.vision_heads:
            p.append(f"`model.vision_hidden` = {m.vision_hidden} is not divisible by "
                     f"`model.vision_heads` = {m.vision_heads}")
        if m.image_size % m.patch_size:
            p.append(f"`model.image_size` = {m.image_size} is not divisible by "
                     f"`model.patch_size` = {m.patch_size}")
        grid = m.image_size // m.patch_size
        if grid % m.feature_pool:
            p.append(f"`model.feature_pool` = {m.feature_pool} does not divide the "
                     f"{grid}x{grid} patch grid of `model.image_size`/`model.patch_size`")
    if cfg.mvtc.dim and cfg.mvtc.dim % cfg.mvtc.heads:
        p.append(f"`mvtc.dim` = {cfg.mvtc.dim} is not divisible by `mvtc.heads` = {cfg.mvtc.heads}")
    hits = cfg.eval.hits_at
    if not hits or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in hits):
        p.append(f"`eval.hits_at` = {hits!r} must be a non-empty list of positive integers")
    if cfg.dataset.name != "synthetic" and not cfg.dataset.path:
        p.append(f"`dataset.path` is empty but `dataset.name` = {cfg.dataset.name!r} is not "
                 "'synthetic'; give the dataset folder")
    if cfg.deepspeed.offload_params and cfg.deepspeed.zero_stage != 3:
        p.append("`deepspeed.offload_params` = true needs `deepspeed.zero_stage` = 3")
    return p


def parse_overrides(overrides: list[str]) -> tuple[dict, list[str]]:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict; values are parsed as YAML scalars."""
    nested: dict = {}
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r} is not of the form key=value")
            continue
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            problems.append(f"override {item!r} has an empty key")
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override {item!r} conflicts with another override")
                break
        else:
            node[parts[-1]] = value
    return nested, problems


def build_config(data: dict | None = None, overrides: list[str] | None = None,
                 source: str = "") -> Config:
    """Schema defaults <- ``data`` <- ``overrides``; raise :class:`ConfigError` on any problem."""
    cfg = Config()
    problems: list[str] = []
    if data:
        _merge_into(cfg, data, "", problems)
    if overrides:
        nested, parse_problems = parse_overrides(overrides)
        problems.extend(parse_problems)
        _merge_into(cfg, nested, "", problems)
    _check_all(cfg, "", problems)
    if not problems:
        problems.extend(_cross_checks(cfg))
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (optional) and apply ``key=value`` overrides."""
    data: dict = {}
    source = ""
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError([f"config file {path} does not exist"], source)
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError([f"{path} is not valid YAML: {err}"], source) from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError([f"{path} must hold a mapping at the top level"], source)
        data = loaded
    return build_config(data, overrides, source)


def config_to_dict(cfg: Any) -> dict:
    """A plain nested dict of the config (JSON/YAML serialisable)."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict) -> Config:
    """Rebuild a config from :func:`config_to_dict` output (e.g. a run's resolved config)."""
    return build_config(data)


def dump_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (and nothing else) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


def config_hash(cfg: Any) -> str:
    """A stable short hash of a config, a section or a plain dict, for manifest keys."""
    import hashlib

    data = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]

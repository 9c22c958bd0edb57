"""Load a :class:`Config`: schema defaults <- ``model.preset`` <- YAML file <- ``key=value``.

The sources are merged into one nested dict and validated in one pydantic pass; every
problem (unknown key, wrong type, out-of-range value, fields that disagree) is translated
into one line of one :class:`ConfigError`, raised before any work starts.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from elmm_ray.config.errors import ConfigError
from elmm_ray.config.keys import key_info, section_class
from elmm_ray.config.presets import MODEL_PRESETS
from elmm_ray.config.schema import RULE_ERROR, Config

log = logging.getLogger(__name__)

__all__ = [
    "ConfigError", "build_config", "config_from_dict", "config_hash", "config_to_dict",
    "dump_config", "load_config", "parse_overrides", "read_yaml",
]

_ADAPTER = TypeAdapter(Config)
_RANGE = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"),
          "less_than_equal": ("le", "<="), "less_than": ("lt", "<")}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "a boolean (true/false)",
               "string": "a string", "list": "a list"}


def parse_overrides(overrides: list[str]) -> tuple[dict, list[str]]:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict; values are parsed as YAML scalars.

    ``key=null`` (or ``~``) gives None; so does ``key=none`` for a key that may be unset
    (elsewhere, e.g. ``prune.method=none``, ``none`` stays a string)."""
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
        info = key_info(key)
        if info and info.optional and isinstance(value, str) and value.lower() == "none":
            value = None
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


def _merge(base: dict, top: dict) -> dict:
    """``top`` over ``base`` (nested dicts merged, anything else replaced); no input changes."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _with_preset(data: dict) -> dict:
    """``data`` over the values of its ``model.preset`` (an unknown name is left to the
    validation, which lists the known ones)."""
    model = data.get("model")
    name = model.get("preset") if isinstance(model, dict) else None
    if isinstance(name, str) and name in MODEL_PRESETS:
        return _merge({"model": MODEL_PRESETS[name]}, data)
    return data


def _whole_floats_to_int(data: dict, prefix: str = "") -> None:
    """``3.0`` -> ``3`` where the schema wants an integer (in place)."""
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            _whole_floats_to_int(value, f"{full}.")
            continue
        info = key_info(full)
        if info is None:
            continue
        if info.kind is int and isinstance(value, float) and value.is_integer():
            data[key] = int(value)
        elif info.item is int and isinstance(value, list):
            data[key] = [int(v) if isinstance(v, float) and v.is_integer() else v
                         for v in value]


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# Keys a config may still carry from an older version: what replaced them.
RETIRED_KEYS = {
    "train.batch_size": "it was per worker, so the objective changed with the worker count; "
    "give `train.global_batch_size` (queries per optimizer step over all workers: the old "
    "batch_size x num_workers x grad_accum)",
}


def _problem(err: dict) -> list[str]:
    """One pydantic error -> our message(s)."""
    kind, loc, value = err["type"], err["loc"], err.get("input")
    ctx = err.get("ctx") or {}
    key = _dotted(loc)
    info = key_info(key)
    if kind == RULE_ERROR:
        return list(ctx["problems"])
    if kind == "invalid_key":
        where = ".".join(str(p) for p in loc[:-1])
        return [f"key {loc[-1]!r}{f' in `{where}`' if where else ''} is not a name"]
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        if key in RETIRED_KEYS:
            return [f"`{key}` is retired: {RETIRED_KEYS[key]}"]
        prefix = ".".join(str(p) for p in loc[:-1])
        cls = section_class(prefix)
        known = sorted(cls.__pydantic_fields__) if cls else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean `{prefix + '.' if prefix else ''}{close[0]}`?" if close else ""
        return [f"unknown key `{key}`{hint} (known keys here: {', '.join(known)})"]
    if kind in ("dataclass_type", "dataclass_exact_type", "dataclass_args_type"):
        return [f"`{key}` is a section; give a mapping, not {value!r}"]
    if kind in _RANGE:
        name, sym = _RANGE[kind]
        tail = ""
        if info and info.optional:
            tail = " or null" + (" (0 no longer means unset: write null)" if value == 0 else "")
        return [f"`{key}` = {value!r} is out of range; it must be {sym} {ctx[name]}{tail}"]
    if kind == "literal_error":
        allowed = info.allowed if info else ctx.get("expected", "")
        return [f"`{key}` = {value!r} is not allowed; choose one of: {allowed}"]
    word = _TYPE_WORDS.get(kind.split("_")[0])
    if word or kind == "int_from_float":
        expected = info.expected if info else (word or "an integer")
        return [f"`{key}` = {value!r} has the wrong type; expected {expected}"]
    return [f"`{key}` = {value!r}: {err['msg']}"]


def build_config(data: dict | None = None, overrides: list[str] | None = None,
                 source: str = "") -> Config:
    """Schema defaults <- ``model.preset`` <- ``data`` <- ``overrides``; raise
    :class:`ConfigError` listing every problem."""
    problems: list[str] = []
    merged: dict = {}
    if data:
        merged = _merge(merged, data)
    if overrides:
        nested, parse_problems = parse_overrides(overrides)
        problems.extend(parse_problems)
        merged = _merge(merged, nested)
    _migrate(merged, source)
    merged = _with_preset(merged)
    _whole_floats_to_int(merged)
    try:
        cfg = _ADAPTER.validate_python(merged)
    except ValidationError as err:
        for e in err.errors():
            problems.extend(p for p in _problem(e) if p not in problems)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def _migrate(merged: dict, source: str) -> None:
    """Keys of older configs (run directories, exports) in their current place:
    ``train.mlflow_uri`` (before the tracking section) -> ``tracking.mlflow_uri`` with
    ``mlflow`` added to ``train.loggers`` when it was set; ``train.storage_endpoint`` (before
    run directories on object storage) -> ``storage_endpoint``."""
    train = merged.get("train")
    if isinstance(train, dict) and "storage_endpoint" in train:
        endpoint = train.pop("storage_endpoint")
        log.warning("%s: `train.storage_endpoint` is now `storage_endpoint` (every s3:// "
                    "location of the run); read it as such", source or "config")
        if endpoint and not merged.get("storage_endpoint"):
            merged["storage_endpoint"] = endpoint
    if isinstance(train, dict) and "mlflow_uri" in train:
        uri = train.pop("mlflow_uri")
        log.warning("%s: `train.mlflow_uri` is now `tracking.mlflow_uri` (with `mlflow` in "
                    "`train.loggers`); read it as such", source or "config")
        if uri:
            tracking = merged.setdefault("tracking", {})
            if isinstance(tracking, dict):
                tracking.setdefault("mlflow_uri", uri)
            loggers = train.get("loggers") or ["jsonl", "tensorboard"]
            if isinstance(loggers, list) and "mlflow" not in loggers:
                train["loggers"] = [*loggers, "mlflow"]


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML would keep
    the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first at line {seen[key]})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _first_bad_utf8_line(data: bytes) -> int:
    for lineno, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), 1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return lineno
    return 1


def read_yaml(path: str | Path, what: str = "config file") -> dict:
    """A YAML mapping from ``path``; every problem (missing, not UTF-8, bad YAML, a key given
    twice, not a mapping) is one line of a :class:`ConfigError` naming ``path:line``."""
    path = Path(path)
    if not path.is_file():
        state = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ConfigError([f"{what} {path} {state}"], str(path))
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        hint = " (it is UTF-16)" if data.startswith((b"\xff\xfe", b"\xfe\xff")) else ""
        raise ConfigError([f"{path}:{_first_bad_utf8_line(data)}: not UTF-8 text{hint}; "
                           "save it as UTF-8"], str(path)) from None
    try:
        loaded = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError([f"{where}: not valid YAML: {problem}"], str(path)) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError([f"{path}:1: must hold a mapping at the top level, not "
                           f"{type(loaded).__name__}"], str(path))
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (optional) and apply ``key=value`` overrides."""
    data = read_yaml(path) if path is not None else {}
    return build_config(data, overrides, str(path) if path is not None else "")


def config_to_dict(cfg: Any) -> dict:
    """A plain nested dict of the config (JSON/YAML serialisable; unset values are None)."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict) -> Config:
    """Rebuild a config from :func:`config_to_dict` output (e.g. a run's resolved config)."""
    return build_config(data)


def dump_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (and nothing else) to ``path``, through a temporary
    file and a rename (a full disk never leaves half a config where a run reads it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
    return path


def config_hash(cfg: Any) -> str:
    """A stable short hash of a config, a section or a plain dict, for manifest keys."""
    import hashlib

    data = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]

"""What the schema says about each key: for error messages, ``format_keys`` (the table behind
``elmm-ray config keys``) and ``json_schema`` (behind ``elmm-ray config schema``)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any

from pydantic import TypeAdapter

from elmm_ray.config.errors import ConfigError
from elmm_ray.config.schema import Config

_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
_TYPE_WORDS = {int: "an integer", float: "a number", bool: "a boolean (true/false)",
               str: "a string", list: "a list"}


@dataclass(frozen=True)
class KeyInfo:
    """One leaf key of the schema."""

    key: str  # dotted, e.g. "train.max_steps"
    kind: type  # int, float, bool, str or list (the value type, None aside)
    optional: bool  # None (null) is allowed: it means "unset"
    choices: tuple | None  # the Literal values, if any
    bounds: tuple[tuple[str, Any], ...]  # (("ge", 1), ...)
    item: type | None  # element type of a list
    default: Any
    help: str

    @property
    def type_name(self) -> str:
        name = self.kind.__name__ + (f"[{self.item.__name__}]" if self.item else "")
        return f"{name} | null" if self.optional else name

    @property
    def expected(self) -> str:
        """The type in words, for "has the wrong type; expected ..."."""
        word = _TYPE_WORDS.get(self.kind, self.kind.__name__)
        if self.item:
            plural = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}
            word = f"a list of {plural.get(self.item, self.item.__name__)}"
        return f"{word} or null" if self.optional else word

    @property
    def allowed(self) -> str:
        """The choices or the range, for tables and messages."""
        if self.choices is not None:
            text = ", ".join(repr(c) for c in self.choices)
        else:
            text = ", ".join(f"{sym} {value}" for sym, value in self.rule_symbols())
        return f"{text}, or null" if text and self.optional else text

    def rule_symbols(self) -> list[tuple[str, Any]]:
        symbols = dict(_BOUNDS)
        return [(symbols[name], value) for name, value in self.bounds]


def _unwrap(annotation: Any) -> tuple[Any, list]:
    """``Annotated[T, *meta]`` -> ``(T, meta)`` (nested Annotated flattened)."""
    meta: list = []
    while typing.get_origin(annotation) is typing.Annotated:
        args = typing.get_args(annotation)
        annotation, meta = args[0], [*args[1:], *meta]
    return annotation, meta


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


def _describe(key: str, info: Any) -> KeyInfo:
    annotation, meta = _unwrap(info.annotation)
    meta = [*meta, *info.metadata]
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(members) < len(typing.get_args(annotation))
        annotation, inner = _unwrap(members[0])
        meta += inner
    choices = item = None
    if typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
        kind = type(choices[0])
    elif typing.get_origin(annotation) is list:
        kind, (item,) = list, typing.get_args(annotation)
        item = _unwrap(item)[0]
    else:
        kind = annotation
    bounds = tuple((name, getattr(m, name)) for m in meta for name, _ in _BOUNDS
                   if getattr(m, name, None) is not None)
    default = info.get_default(call_default_factory=True)
    return KeyInfo(key=key, kind=kind, optional=optional, choices=choices, bounds=bounds,
                   item=item, default=default, help=info.description or "")


@cache
def _tables() -> tuple[dict[str, type], dict[str, KeyInfo]]:
    """(dotted section -> its class, with "" for Config; dotted key -> KeyInfo)."""
    sections: dict[str, type] = {}
    keys: dict[str, KeyInfo] = {}

    def walk(cls: type, prefix: str) -> None:
        sections[prefix.rstrip(".")] = cls
        for name, info in cls.__pydantic_fields__.items():
            if _is_section(info.annotation):
                walk(info.annotation, f"{prefix}{name}.")
            else:
                keys[f"{prefix}{name}"] = _describe(f"{prefix}{name}", info)

    walk(Config, "")
    return sections, keys


def section_class(path: str) -> type | None:
    """The dataclass of a dotted section (``""`` is :class:`Config`), or None."""
    return _tables()[0].get(path)


def key_info(key: str) -> KeyInfo | None:
    """What the schema says about a dotted leaf key, or None if there is no such key."""
    return _tables()[1].get(key)


def all_keys() -> list[KeyInfo]:
    """Every leaf key in schema order."""
    return list(_tables()[1].values())


def _shown(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def format_keys(section: str | None = None) -> str:
    """Every key (or those of ``section``, e.g. ``train`` or ``dataset.synth``) as a table:
    dotted key, type, default, allowed values or range, help. An unknown section raises
    :class:`ConfigError` with a "did you mean"."""
    keys = all_keys()
    if section:
        section = section.strip().strip(".")
        sections = [s for s in _tables()[0] if s]
        if section in sections:
            keys = [k for k in keys if k.key.startswith(f"{section}.")]
        elif key_info(section):
            keys = [key_info(section)]
        else:
            close = difflib.get_close_matches(section, sections + [k.key for k in keys], n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise ConfigError([f"unknown section `{section}`{hint} "
                               f"(sections: {', '.join(sections)})"])
    headers = ("key", "type", "default", "allowed", "help")
    rows = [(k.key, k.type_name, _shown(k.default), k.allowed, k.help) for k in keys]
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers) - 1)]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join([*(c.ljust(w) for c, w in zip(row, widths)), row[-1]]).rstrip()

    rule = ("-" * w for w in [*widths, len(headers[-1])])
    return "\n".join([line(headers), "  ".join(rule), *(line(r) for r in rows)])


def json_schema() -> dict:
    """The JSON Schema of :class:`Config` (every key with type, default, range, choices and
    help; ``additionalProperties: false`` on every section)."""
    return TypeAdapter(Config).json_schema()


# The config keys a user most often sets for each command (every key: `config keys`).
COMMAND_KEYS: dict[str, tuple[str, ...]] = {
    "run": ("run_dir", "dataset.name", "dataset.path", "model.preset", "model.backbone",
            "model.vision_tower", "mvtc.n_visual", "mvtc.n_text", "train.backend", "train.epochs",
            "train.num_workers", "train.use_gpu", "prune.method", "prune.ratio"),
    "train": ("train.backend", "train.epochs", "train.max_steps", "train.global_batch_size",
              "train.learning_rate", "train.num_negatives", "train.knowledge_weight",
              "train.num_workers", "train.use_gpu", "deepspeed.zero_stage", "lora.r",
              "model.entity_repr", "train.loggers"),
    "eval": ("eval.split", "eval.max_queries", "eval.batch_size", "eval.hits_at", "eval.workers"),
    "extract": ("images.max_images_per_entity", "model.vision_tower",
                "model.vision_feature_layer",
                "model.feature_pool", "ray.data_actors", "ray.data_actor_cpus",
                "ray.data_actor_gpus", "ray.data_batch_size", "ray.data_part_rows",
                "dataset.visual_embeddings.path"),
    "entity_init": ("ray.data_actors", "ray.data_actor_cpus", "ray.data_actor_gpus",
                    "ray.data_batch_size"),
    "prune": ("prune.method", "prune.ratio", "prune.steps", "prune.calib_samples",
              "prune.finetune_steps", "prune.knowledge_weight"),
    "pack": ("images.max_shard_bytes", "images.min_side", "images.num_cpus_per_task"),
    "tune": ("tune.search", "tune.scheduler", "tune.num_samples", "tune.metric", "tune.mode",
             "tune.objectives", "tune.max_concurrent_trials"),
    "export": ("export.checkpoint", "export.license"),
    "plan": ("model.backbone", "mvtc.n_visual", "mvtc.n_text", "train.global_batch_size",
             "train.grad_accum", "train.num_workers", "deepspeed.zero_stage", "eval.batch_size"),
}


def keys_epilog(command: str) -> str:
    """The help text naming ``command``'s keys, from the schema's own help."""
    lines = ["config keys that matter here (in the YAML or as key=value; every key: "
             "`elmm-ray config keys [SECTION]`):"]
    for key in COMMAND_KEYS.get(command, ()):
        info = key_info(key)
        if info is not None:
            default = json.dumps(info.default) if info.default is not None else "null"
            lines.append(f"  {key:<30} {info.help} (default {default})")
    return "\n".join(lines)

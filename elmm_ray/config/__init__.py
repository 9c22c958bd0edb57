"""Typed configuration: schema, presets, loading (defaults <- preset <- YAML <- key=value),
validation, and help for users (``format_keys``, ``json_schema``)."""

from elmm_ray.config.errors import ConfigError
from elmm_ray.config.keys import KeyInfo, all_keys, format_keys, json_schema, key_info
from elmm_ray.config.load import (
    build_config,
    config_from_dict,
    config_hash,
    config_to_dict,
    dump_config,
    load_config,
    parse_overrides,
    read_yaml,
)
from elmm_ray.config.presets import MODEL_PRESETS
from elmm_ray.config.schema import (
    Config,
    DatasetConfig,
    DeepSpeedConfig,
    EvalConfig,
    ExportConfig,
    ImagesConfig,
    LoraConfig,
    ModelConfig,
    MVTCConfig,
    PruneConfig,
    RayConfig,
    SynthConfig,
    TrainConfig,
    TuneConfig,
    max_workers,
    min_workers,
    worker_range,
)

__all__ = [
    "MODEL_PRESETS", "Config", "ConfigError", "DatasetConfig", "DeepSpeedConfig", "EvalConfig",
    "ExportConfig", "ImagesConfig", "KeyInfo", "LoraConfig", "MVTCConfig", "ModelConfig",
    "PruneConfig", "RayConfig", "SynthConfig", "TrainConfig", "TuneConfig", "all_keys",
    "build_config", "config_from_dict", "config_hash", "config_to_dict", "dump_config",
    "format_keys", "json_schema", "key_info", "load_config", "max_workers", "min_workers",
    "parse_overrides", "read_yaml", "worker_range",
]

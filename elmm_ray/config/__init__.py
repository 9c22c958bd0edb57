"""Typed configuration: schema, loading (defaults <- YAML <- key=value) and validation."""

from elmm_ray.config.load import (
    ConfigError,
    build_config,
    config_from_dict,
    config_hash,
    config_to_dict,
    dump_config,
    load_config,
)
from elmm_ray.config.schema import (
    Config,
    DatasetConfig,
    DeepSpeedConfig,
    EvalConfig,
    ImagesConfig,
    LoraConfig,
    ModelConfig,
    MVTCConfig,
    PruneConfig,
    RayConfig,
    SynthConfig,
    TrainConfig,
)

__all__ = [
    "Config", "ConfigError", "DatasetConfig", "DeepSpeedConfig", "EvalConfig", "ImagesConfig",
    "LoraConfig", "MVTCConfig", "ModelConfig", "PruneConfig", "RayConfig", "SynthConfig",
    "TrainConfig", "build_config", "config_from_dict", "config_hash", "config_to_dict",
    "dump_config", "load_config",
]

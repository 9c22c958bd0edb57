from pathlib import Path

import pytest
import yaml

from elmm_ray.cli import main
from elmm_ray.config import (
    Config,
    ConfigError,
    build_config,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_valid():
    cfg = build_config()
    assert isinstance(cfg, Config)
    assert cfg.mvtc.n_visual == 32 and cfg.mvtc.n_text == 32


def test_merge_order_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n  learning_rate: 0.01\nmvtc:\n  n_text: 4\n")
    cfg = load_config(path, ["train.epochs=5", "mvtc.n_visual=0"])
    assert cfg.train.epochs == 5  # override wins over YAML
    assert cfg.train.learning_rate == 0.01  # YAML wins over default
    assert cfg.mvtc.n_text == 4 and cfg.mvtc.n_visual == 0
    assert cfg.train.batch_size == Config().train.batch_size  # default kept


def test_every_problem_is_listed_with_key_value_and_rule():
    with pytest.raises(ConfigError) as info:
        build_config(overrides=["train.lerning_rate=1", "model.dtype=fp8",
                                "train.batch_size=0", "train.epochs=x", "nosuch.section=1"])
    err = info.value
    assert len(err.problems) == 5
    text = str(err)
    assert "train.lerning_rate" in text and "did you mean `train.learning_rate`" in text
    assert "`model.dtype` = 'fp8'" in text and "'float32'" in text
    assert "`train.batch_size` = 0" in text and ">= 1" in text
    assert "`train.epochs` = 'x'" in text and "integer" in text
    assert "unknown key `nosuch`" in text


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="min_images"):
        build_config(overrides=["dataset.synth.min_images=5", "dataset.synth.max_images=2"])
    with pytest.raises(ConfigError, match="llm_kv_heads"):
        build_config(overrides=["model.llm_heads=4", "model.llm_kv_heads=3"])
    with pytest.raises(ConfigError, match="dataset.path"):
        build_config(overrides=["dataset.name=fb15k237"])


def test_types_are_coerced_sensibly():
    cfg = build_config(overrides=["train.learning_rate=1", "train.epochs=2.0",
                                  "lora.enabled=false"])
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.epochs == 2 and isinstance(cfg.train.epochs, int)
    assert cfg.lora.enabled is False
    with pytest.raises(ConfigError, match="boolean"):
        build_config(overrides=["lora.enabled=1"])
    with pytest.raises(ConfigError, match="is a section"):
        build_config({"train": 3})


def test_round_trip_through_yaml(tmp_path):
    cfg = build_config(overrides=["train.epochs=7", "eval.hits_at=[1,5]"])
    path = dump_config(cfg, tmp_path / "resolved.yaml")
    again = config_from_dict(yaml.safe_load(path.read_text()))
    assert config_to_dict(again) == config_to_dict(cfg)


def _shipped_yaml(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.yaml"))


@pytest.mark.parametrize("path", _shipped_yaml("configs"), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    text = path.read_text()
    assert text.startswith("# Launch:"), f"{path} must open with the command that launches it"
    load_config(path)


def test_every_tune_space_loads():
    from elmm_ray.tune.space import load_space

    for path in _shipped_yaml("tune_spaces"):
        load_space(path)


def test_cli_validate(capsys):
    demo = str(REPO / "configs" / "demo.yaml")
    assert main(["validate", demo]) == 0
    assert main(["validate", demo, "train.lerning_rate=1"]) == 2
    assert "train.lerning_rate" in capsys.readouterr().err


def test_cluster_files_parse_and_point_at_real_scripts():
    import re

    paths = sorted((REPO / "cluster").rglob("*.yaml"))
    assert paths, "cluster/ ships launcher and KubeRay configs"
    for path in paths:
        text = path.read_text()
        docs = list(yaml.safe_load_all(text))
        assert docs and all(isinstance(d, dict) for d in docs), path
        for script, config in re.findall(r"python (jobs/\S+\.py) --config (\S+\.yaml)", text):
            assert (REPO / script).is_file(), f"{path} names missing {script}"
            assert (REPO / config).is_file(), f"{path} names missing {config}"
            load_config(REPO / config)

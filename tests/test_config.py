import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from elmm_ray.cli import main
from elmm_ray.config import (
    MODEL_PRESETS,
    Config,
    ConfigError,
    build_config,
    config_from_dict,
    config_to_dict,
    dump_config,
    format_keys,
    json_schema,
    load_config,
    parse_overrides,
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
    assert cfg.train.global_batch_size == Config().train.global_batch_size  # default kept


def test_every_problem_is_listed_with_key_value_and_rule():
    with pytest.raises(ConfigError) as info:
        build_config(overrides=["train.lerning_rate=1", "model.dtype=fp8",
                                "train.global_batch_size=0", "train.epochs=x", "nosuch.section=1"])
    err = info.value
    assert len(err.problems) == 5
    text = str(err)
    assert "train.lerning_rate" in text and "did you mean `train.learning_rate`" in text
    assert "`model.dtype` = 'fp8'" in text and "'float32'" in text
    assert "`train.global_batch_size` = 0" in text and ">= 1" in text
    assert "`train.epochs` = 'x'" in text and "integer" in text
    assert "unknown key `nosuch`" in text


def test_global_batch_and_worker_ranges():
    """The batch is global (the retired per-worker key says what replaced it); workers are N
    or an elastic [MIN, MAX]; a micro-step must give every worker a query."""
    from elmm_ray.config import max_workers, min_workers

    with pytest.raises(ConfigError, match=r"`train.batch_size` is retired.*global_batch_size"):
        build_config(overrides=["train.batch_size=16"])
    cfg = build_config(overrides=["train.num_workers=[1, 3]", "train.global_batch_size=12",
                                  "train.grad_accum=2"])
    assert cfg.train.num_workers == (1, 3)
    assert (min_workers(cfg.train), max_workers(cfg.train)) == (1, 3)
    assert build_config(overrides=["train.num_workers=[2, 2]"]).train.num_workers == 2
    assert config_from_dict(config_to_dict(cfg)) == cfg  # a range survives the round trip
    for bad, message in (("train.num_workers=[3, 1]", "1 <= MIN <= MAX"),
                         ("train.num_workers=[0, 2]", "1 <= MIN <= MAX"),
                         ("train.num_workers=0", "at least 1"),
                         ("train.num_workers=[1, 2, 3]", "N or an elastic range"),
                         ("train.num_workers=true", "N or an elastic range")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            build_config(overrides=[bad])
    with pytest.raises(ConfigError, match="not a multiple of `train.grad_accum`"):
        build_config(overrides=["train.global_batch_size=10", "train.grad_accum=3"])
    with pytest.raises(ConfigError, match="cannot feed 4 workers"):
        build_config(overrides=["train.global_batch_size=6", "train.grad_accum=2",
                                "train.num_workers=[1, 4]"])


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
    assert main(["validate", demo, "train.lerning_rate=1", "mvtc.n_visual=-1"]) == 2
    err = capsys.readouterr().err
    assert "did you mean `train.learning_rate`" in err and "`mvtc.n_visual` = -1" in err


def test_cli_config_keys_and_schema(capsys, tmp_path):
    assert main(["config", "keys", "train"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("train.learning_rate "))
    assert "0.001" in row and "peak learning rate" in row
    assert "model.backbone" not in out
    assert main(["config", "keys", "trian"]) == 2
    assert "did you mean `train`" in capsys.readouterr().err
    schema_file = tmp_path / "schema.json"
    assert main(["config", "schema", "--out", str(schema_file)]) == 0
    schema = json.loads(schema_file.read_text())
    assert schema["additionalProperties"] is False and "train" in schema["properties"]


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


def test_two_problems_are_listed_at_once(capsys):
    with pytest.raises(ConfigError) as info:
        build_config(overrides=["train.lerning_rate=1", "mvtc.n_visual=-1"])
    assert len(info.value.problems) == 2
    text = str(info.value)
    assert "did you mean `train.learning_rate`" in text
    assert "`mvtc.n_visual` = -1 is out of range; it must be >= 0" in text
    demo = str(REPO / "configs" / "demo.yaml")
    assert main(["validate", demo, "train.lerning_rate=1", "mvtc.n_visual=-1"]) == 2
    err = capsys.readouterr().err
    assert "train.lerning_rate" in err and "mvtc.n_visual" in err


def test_rules_of_several_fields_are_listed_with_field_problems():
    with pytest.raises(ConfigError) as info:
        build_config(overrides=["dataset.synth.min_images=5", "dataset.synth.max_images=2",
                                "train.epochs=0", "mvtc.dim=6", "deepspeed.offload_params=true"])
    text = str(info.value)
    assert len(info.value.problems) == 4
    assert "min_images" in text and "`train.epochs` = 0" in text
    assert "`mvtc.dim` = 6 is not divisible by `mvtc.heads` = 8" in text
    assert "zero_stage` = 3" in text


def test_strict_types():
    problems = {
        "train.epochs=true": "expected an integer",
        "train.learning_rate=true": "expected a number",
        "run_dir=3": "expected a string",
        "deepspeed.zero_stage=true": "expected an integer",
        "deepspeed.zero_stage=5": "choose one of: 0, 1, 2, 3",
        "eval.hits_at=[]": "non-empty list of positive integers",
        "eval.hits_at=[1,0]": "non-empty list of positive integers",
        "eval.hits_at=[1,x]": "`eval.hits_at[1]` = 'x' has the wrong type",
        "train.epochs=2.5": "expected an integer",
    }
    for override, message in problems.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            build_config(overrides=[override])
    cfg = build_config(overrides=["deepspeed.zero_stage=3.0", "eval.hits_at=[1.0,5]"])
    assert cfg.deepspeed.zero_stage == 3 and cfg.eval.hits_at == [1, 5]


def test_unset_values_are_none():
    cfg = build_config()
    unset = {"dataset.path", "dataset.image_root", "images.shard_dir", "images.feature_store",
             "train.max_steps", "train.max_minutes", "train.eval_every", "tracking.mlflow_uri",
             "train.fail_at_step", "mvtc.dim", "prune.compensation_rank", "eval.max_queries",
             "ray.address", "ray.num_cpus", "model.preset"}
    for key in unset:
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) is None, key
    assert cfg.train.val_max_queries == 500
    assert config_to_dict(cfg)["train"]["max_steps"] is None


def test_null_and_none_overrides():
    nested, problems = parse_overrides(["train.max_steps=null", "ray.num_cpus=none",
                                        "prune.method=none", "dataset.path="])
    assert not problems
    assert nested["train"]["max_steps"] is None and nested["ray"]["num_cpus"] is None
    assert nested["prune"]["method"] == "none"  # a choice, not "unset"
    cfg = build_config(overrides=["train.max_steps=7", "train.max_steps=null", "ray.num_cpus=none",
                                  "prune.method=none", "train.val_max_queries=null",
                                  "dataset.path="])
    assert cfg.train.max_steps is None and cfg.ray.num_cpus is None
    assert cfg.train.val_max_queries is None and cfg.dataset.path is None  # "" is unset
    assert cfg.prune.method == "none"
    with pytest.raises(ConfigError, match=r"`train.max_steps` = 0 .* >= 1 or null"):
        build_config(overrides=["train.max_steps=0"])
    with pytest.raises(ConfigError, match="expected an integer"):
        build_config(overrides=["train.epochs=null"])


def test_round_trip_keeps_none(tmp_path):
    cfg = build_config(overrides=["train.max_steps=5", "mvtc.dim=16", "mvtc.heads=4"])
    again = config_from_dict(yaml.safe_load(dump_config(cfg, tmp_path / "c.yaml").read_text()))
    assert again == cfg and again.train.eval_every is None and again.mvtc.dim == 16


def test_configs_are_frozen_and_replace_validates():
    cfg = build_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run_dir = "elsewhere"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3
    changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=3))
    assert changed.train.epochs == 3 and cfg.train.epochs == 10
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        dataclasses.replace(cfg.train, epochs=0)
    with pytest.raises(ValidationError, match="llm_kv_heads"):
        dataclasses.replace(cfg.model, llm_kv_heads=3)
    assert dataclasses.asdict(cfg) == config_to_dict(cfg)


def test_preset_precedence(tmp_path):
    tiny_test = build_config(overrides=["model.preset=tiny-test"]).model
    for key, value in MODEL_PRESETS["tiny-test"].items():
        assert getattr(tiny_test, key) == value  # preset beats the schema defaults
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: tiny\n  llm_layers: 3\n  vocab_size: 500\n")
    cfg = load_config(path, ["model.vocab_size=700"])
    assert cfg.model.preset == "tiny" and cfg.model.patch_size == 4  # from the preset
    assert cfg.model.llm_layers == 3  # YAML beats the preset
    assert cfg.model.vocab_size == 700  # the override beats YAML
    # an override can switch the preset; YAML keys still win over it
    cfg = load_config(path, ["model.preset=tiny-test"])
    assert cfg.model.image_size == 32 and cfg.model.llm_layers == 3
    llava = build_config(overrides=["model.preset=llava-1.5-7b"]).model
    assert llava.backbone == "llava-hf/llava-1.5-7b-hf" and llava.dtype == "bfloat16"
    assert build_config().model.preset is None


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ConfigError) as info:
        build_config(overrides=["model.preset=huge", "train.epochs=0"])
    text = str(info.value)
    assert len(info.value.problems) == 2
    assert "`model.preset` = 'huge' is not allowed" in text
    assert all(repr(name) in text for name in MODEL_PRESETS)


def test_every_preset_is_valid():
    for name, values in MODEL_PRESETS.items():
        model = build_config(overrides=[f"model.preset={name}"]).model
        assert {k: getattr(model, k) for k in values} == values, name


def test_format_keys():
    table = format_keys("train")
    line = next(row for row in table.splitlines() if row.startswith("train.learning_rate "))
    assert "float" in line and "0.001" in line and "> 0" in line and "peak learning rate" in line
    assert "train.max_steps" in table and "int | null" in table
    assert all(row.startswith(("train.", "key", "---")) for row in table.splitlines())
    synth = format_keys("dataset.synth")
    assert "dataset.synth.min_images" in synth and "dataset.name" not in synth
    everything = format_keys()
    assert "'float32', 'bfloat16', 'float16'" in everything and "ray.num_cpus" in everything
    keys = _leaf_keys(Config())
    assert [row.split()[0] for row in everything.splitlines()[2:]] == keys


def _leaf_keys(obj, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += _leaf_keys(value, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def test_format_keys_unknown_section():
    with pytest.raises(ConfigError, match=r"unknown section `trian`; did you mean `train`\?"):
        format_keys("trian")


def test_json_schema():
    schema = json_schema()
    assert schema["additionalProperties"] is False
    for f in dataclasses.fields(Config):
        assert f.name in schema["properties"]
    defs = schema["$defs"]
    assert {"TrainConfig", "ModelConfig", "SynthConfig", "RayConfig"} <= set(defs)
    assert all(d["additionalProperties"] is False for d in defs.values())
    lr = defs["TrainConfig"]["properties"]["learning_rate"]
    assert lr["exclusiveMinimum"] == 0 and lr["default"] == 0.001
    assert lr["description"] == "peak learning rate"
    max_steps = defs["TrainConfig"]["properties"]["max_steps"]
    assert {"minimum": 1, "type": "integer"} in max_steps["anyOf"]
    assert {"type": "null"} in max_steps["anyOf"]
    assert defs["ModelConfig"]["properties"]["dtype"]["enum"] == ["float32", "bfloat16", "float16"]


def test_tune_space_typo_is_reported(tmp_path):
    from elmm_ray.tune.space import load_space

    path = tmp_path / "space.yaml"
    path.write_text("params:\n  train.lerning_rate: {type: uniform, low: 0.001, high: 0.01}\n"
                    "  mvtc.n_visual: {type: choice, values: [4, -1]}\n")
    with pytest.raises(ConfigError) as info:
        load_space(path)
    text = str(info.value)
    assert "did you mean `train.learning_rate`" in text and "`mvtc.n_visual` = -1" in text

"""`elmm-ray plan`: the configured ELMM on the meta device from a shipped config.json (nothing
downloaded), its memory per GPU, time and cost per stage, and the refusal of what does not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from elmm_ray.cli import main
from elmm_ray.config import load_config
from elmm_ray.plan.command import check_before_run
from elmm_ray.plan.hardware import hardware_of
from elmm_ray.plan.meta import PlanError
from elmm_ray.plan.report import asha_fraction, make_plan

REPO = Path(__file__).resolve().parents[1]
PAPER = str(REPO / "configs" / "fb15k237_llava7b.yaml")
LLAVA_7B = 7_063_427_072  # llava-hf/llava-1.5-7b-hf's own count (CLIP-L/336 + projector + Llama)


def _backbone(plan: dict) -> int:
    groups = plan["params_by_group"]
    return groups["llm"] + groups["vision_tower"] + groups["projector"]


def test_paper_config_plans_offline_and_fits(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["plan", PAPER, "--json", "--cluster", str(REPO / "cluster/aws-a100.yaml")]) == 0
    plan = json.loads(capsys.readouterr().out)
    for key in ("params_total", "params_trainable", "gpu_memory_gib", "fits",
                "feature_store_gib", "train_flops_per_step", "est_train_hours"):
        assert key in plan, key
    assert _backbone(plan) == LLAVA_7B
    assert plan["fits"] is True and plan["hardware"]["instance"] == "p4de.24xlarge"
    trained = plan["trainable_by_group"]
    assert trained["llm"] == trained["vision_tower"] == 0
    assert trained["lora"] == 32 * 4 * 16 * (4096 + 4096)  # r=16 on q, k, v, o of 32 layers
    assert trained["entity_table"] > 14_541 * 4096
    assert plan["params_trainable"] == sum(trained.values())
    assert any("LoRA on 128 modules" in c for c in plan["checks"])
    memory = plan["gpu_memory_gib"]
    assert memory["train ZeRO-3"] < memory["train ZeRO-2"]
    assert memory["train ZeRO-2 + grad ckpt"] < memory["train ZeRO-2"]
    assert 150 < plan["feature_store_gib"] < 170  # 145,410 images x 576 x 1024 x fp16
    # a step: 128 queries through a ~6.7 B-parameter LLM, forward + backward (~2 x 2 x N x tokens)
    assert 4e14 < plan["train_flops_per_step"] < 8e14
    assert plan["est_train_hours"] > 0 and plan["est_usd"] > 0


def test_13b_plans_from_the_shipped_config():
    cfg = load_config(PAPER, ["model.backbone=llava-hf/llava-1.5-13b-hf"])
    plan = make_plan(cfg)
    groups, (v, h, i, layers) = plan["params_by_group"], (32_064, 5120, 13_824, 40)
    assert groups["llm"] == 2 * v * h + layers * (4 * h * h + 3 * h * i + 2 * h) + h
    assert groups["projector"] == 1024 * h + h + h * h + h
    assert groups["vision_tower"] == 303_507_456  # the same CLIP ViT-L/14-336 as the 7B's
    assert plan["fits"] and plan["trainable_by_group"]["lora"] == 40 * 4 * 16 * (5120 + 5120)


def test_oversized_config_is_refused_with_the_reason_and_remedies(capsys):
    big = ["train.global_batch_size=1024", "model.backbone=llava-hf/llava-1.5-13b-hf"]
    assert main(["plan", PAPER, *big]) == 3
    out = capsys.readouterr().out
    assert "fits: NO" in out and "train ZeRO-2 needs" in out
    assert "train.grad_accum=" in out and "gradient checkpointing" in out
    cfg = load_config(PAPER, big)
    with pytest.raises(ValueError, match=r"does not fit: train ZeRO-2 needs .*--ignore-plan"):
        check_before_run(cfg)
    check_before_run(cfg, ignore=True)  # told to go on: the summary only
    assert "DOES NOT FIT" in capsys.readouterr().out


@pytest.mark.parametrize("override, message", [
    ("mvtc.heads=7", r"1024 is not divisible by `mvtc.heads` = 7"),
    ("model.vision_feature_layer=30", r"outside the 24-layer vision tower"),
    ("lora.target_regex=.*language_model.*\\.nonexistent$", r"`lora.target_regex`.*matches no"),
    ("model.feature_pool=5", r"does not divide the 24x24 patch grid"),
])
def test_a_mismatch_is_named(override, message):
    with pytest.raises(PlanError, match=message):
        make_plan(load_config(PAPER, [override]))


def test_unknown_backbone_is_named_without_downloading(tmp_path):
    with pytest.raises(PlanError, match="no config.json"):
        make_plan(load_config(PAPER, [f"model.backbone={tmp_path}"]))
    unknown = load_config(PAPER, ["model.backbone=someone/not-a-real-llava"])
    with pytest.raises(PlanError, match="neither a local directory nor a hub id"):
        make_plan(unknown)
    check_before_run(unknown)  # no plan offline: said, and the run (which fetches it) goes on
    with pytest.raises(PlanError, match="mvtc.heads"):  # a mismatch still stops the run
        check_before_run(load_config(PAPER, ["mvtc.heads=7"]))
    check_before_run(load_config(PAPER, ["mvtc.heads=7"]), ignore=True)  # unless told


def test_run_refuses_before_any_stage(tmp_path, monkeypatch, capsys):
    import elmm_ray.pipeline

    monkeypatch.setattr(elmm_ray.pipeline, "run_all", lambda cfg: pytest.fail("ran"))
    big = ["train.global_batch_size=1024", "model.backbone=llava-hf/llava-1.5-13b-hf",
           f"run_dir={tmp_path / 'run'}"]
    assert main(["run", PAPER, *big]) == 2
    assert "does not fit" in capsys.readouterr().err


def test_cluster_files_name_their_gpu_and_price():
    assert hardware_of(str(REPO / "cluster/gcp-a100.yaml")).instance == "a2-ultragpu-8g"
    kuberay = hardware_of(str(REPO / "cluster/kuberay/raycluster.yaml"))
    assert kuberay.gpu == "A100-80GB" and kuberay.usd_per_hour
    with pytest.raises(FileNotFoundError):
        hardware_of("cluster/none.yaml")


def test_asha_spends_a_share_of_the_budget():
    assert asha_fraction(8, 1, 1, 2) == 1.0  # one round: nothing to stop
    share = asha_fraction(16, 8, 1, 2)
    assert 0 < share < 0.5  # rungs at 1, 2, 4, 8 rounds keep 1/2 each
    assert asha_fraction(16, 8, 8, 2) == 1.0  # grace period covers every round


def test_sweep_cost(capsys):
    assert main(["plan", PAPER, "--space", str(REPO / "tune_spaces/compression.yaml")]) == 0
    out = capsys.readouterr().out
    assert "sweep" in out and "4 trials" in out and "ASHA spends" in out


def test_zero_1_is_planned_as_configured_with_replicated_gradients():
    plan = make_plan(load_config(PAPER, ["deepspeed.zero_stage=1"]))
    rows = {r["stage"]: r for r in plan["stages"]}
    assert [n for n, r in rows.items() if r["configured"] and n.startswith("train")] == [
        "train ZeRO-1"]
    z1, z2 = rows["train ZeRO-1"]["memory_parts_gib"], rows["train ZeRO-2"]["memory_parts_gib"]
    assert z1["gradients"] == pytest.approx(z2["gradients"] * plan["workers"])
    assert z1["optimizer states"] == pytest.approx(z2["optimizer states"])
    assert z1["buffers"] > 0.2  # the fp32 entity cache (14,541 x 4096) and its kin

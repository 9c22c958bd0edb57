"""Export of the tiny run: the best validation round kept and exported, the LoRA adapter
in PEFT format loading onto the unmerged base backbone, and the model card."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from elmm_ray.cli import main
from elmm_ray.config import load_config
from elmm_ray.data.dataset import load_dataset
from elmm_ray.eval.evaluate import evaluate_model
from elmm_ray.export import CARD_FILE, MARKER, load_base_backbone, read_front_matter
from elmm_ray.layout import RunLayout, absolute_paths, read_json
from elmm_ray.stages import run_stages
from elmm_ray.stages.export import eval_export
from elmm_ray.train.context import final_checkpoint, final_context
from tests.tiny import TINY as TINY_BASE

# Validation every 3 steps; with this seed the last round is not the best one.
TINY = [*TINY_BASE, "train.epochs=4", "train.eval_every=3", "train.val_max_queries=40"]


def test_missing_best_checkpoint_names_the_file_and_the_way_out(tmp_path):
    cfg = absolute_paths(load_config("configs/demo.yaml", [f"run_dir={tmp_path}"]))
    with pytest.raises(FileNotFoundError, match=r"train/best/best\.json.*--checkpoint last"):
        final_checkpoint(cfg, "best")
    pruned = absolute_paths(load_config("configs/demo.yaml", [
        f"run_dir={tmp_path}", "prune.method=magnitude", "prune.finetune_steps=0"]))
    (tmp_path / "prune" / "model").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="finetune_steps=0"):
        final_checkpoint(pruned, "best")


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_session):
    """The tiny run trained (local backend) and evaluated, then `elmm-ray export RUN_DIR
    --checkpoint best`."""
    run_dir = tmp_path_factory.mktemp("export_run")
    cfg = absolute_paths(load_config("configs/demo.yaml", [f"run_dir={run_dir}", *TINY]))
    run_stages(["eval"], cfg, show_progress=False)
    assert main(["export", str(run_dir), "--checkpoint", "best"]) == 0
    cfg = absolute_paths(load_config(run_dir / "config.yaml", [f"run_dir={run_dir}"]))
    return cfg, load_dataset(cfg)


def _history(cfg) -> list[dict]:
    path = RunLayout.of(cfg).path("train", "metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_best_round_is_kept_with_its_record(run):
    cfg, kg = run
    history = _history(cfg)
    best = max(history, key=lambda h: h["val_mrr"])
    record = read_json(RunLayout.of(cfg).best_model / "best.json")
    assert record["step"] == best["step"] and record["val_mrr"] == best["val_mrr"]
    assert record["step"] != history[-1]["step"]  # best != last in this run
    # The kept weights are that round's: validating them again gives its MRR.
    ctx = final_context(cfg, kg, "best")
    again = evaluate_model(ctx.model, ctx.collator, ctx.features, kg, split="valid",
                           batch_size=cfg.eval.batch_size,
                           max_queries=cfg.train.val_max_queries, ks=cfg.eval.hits_at)
    assert again["overall"]["mrr"] == pytest.approx(record["val_mrr"], abs=1e-6)
    last = final_checkpoint(cfg, "last")
    assert last["record"]["step"] == history[-1]["step"]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_export_card_front_matter_and_metrics_equal_the_eval(run):
    cfg, kg = run
    out = RunLayout.of(cfg).export_dir
    meta = read_json(out / MARKER)
    best = read_json(RunLayout.of(cfg).best_model / "best.json")
    assert meta["checkpoint"]["checkpoint"] == "best"
    assert meta["checkpoint"]["record"]["step"] == best["step"]
    card = (out / CARD_FILE).read_text()
    front = read_front_matter(out / CARD_FILE)
    assert front["library_name"] == "peft" and front["datasets"] == [cfg.dataset.name]
    assert front["base_model"] == str(RunLayout.of(cfg).backbone) and front["license"]
    values = {m["type"]: m["value"] for m in
              front["model-index"][0]["results"][0]["metrics"]}
    assert set(values) == {"mrr", "hits@1", "hits@3", "hits@10"}
    written = read_json(out / f"metrics_{cfg.eval.split}.json")
    evaluated = eval_export(out)  # the exported (merged) model on its dataset
    for key, value in values.items():
        assert value == written["overall"][key]
        assert value == pytest.approx(evaluated["overall"][key], abs=1e-6)
    # The best weights were measured, not the eval stage's last ones.
    assert meta["metrics"] == f"metrics_{cfg.eval.split}.json"
    assert f"step {best['step']}" in card and "`best`" in card
    assert f"Visual tokens per query: **{cfg.mvtc.n_visual + cfg.mvtc.n_text}**" in card
    for count in (kg.num_entities, kg.num_relations, len(kg.triples["test"])):
        assert f"| {count:,} |" in card
    assert f"| overall | {written['overall']['count']} | {values['mrr']:.4f} |" in card
    # The card's predict command works as written.
    command = next(line for line in card.splitlines() if line.startswith("elmm-ray predict"))
    head = command.split("--head ")[1].split(" --relation")[0].strip("'")
    relation = command.split("--relation ")[1].split(" --k")[0].strip("'")
    assert main(["predict", str(out), "--head", head, "--relation", relation]) == 0


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_peft_adapter_loads_onto_the_base_and_matches_the_lora_model(run, tmp_path):
    from peft import PeftModel

    cfg, kg = run
    out = RunLayout.of(cfg).export_dir
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == cfg.lora.r and config["lora_alpha"] == cfg.lora.alpha
    assert config["lora_dropout"] == cfg.lora.dropout
    assert config["target_modules"] and all(".language_model." in t
                                            for t in config["target_modules"])
    ctx = final_context(cfg, kg, "best")  # the project's LoRA model, unmerged
    ctx.model.eval()
    peft_model = PeftModel.from_pretrained(load_base_backbone(out), out / "adapter").eval()
    plain = load_base_backbone(out).eval()
    torch.manual_seed(0)
    hidden = cfg.model.llm_hidden
    embeds = torch.randn(3, 7, hidden)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        ours = ctx.model.language_model(inputs_embeds=embeds, attention_mask=mask)
        theirs = peft_model.base_model.model.model.language_model(inputs_embeds=embeds,
                                                                 attention_mask=mask)
        base_only = plain.model.language_model(inputs_embeds=embeds, attention_mask=mask)
        features = torch.randn(2, 5, ctx.model.projector.linear_1.in_features)
        projected = (ctx.model.projector(features),
                     peft_model.base_model.model.model.multi_modal_projector(features))
    ours, theirs = ours.last_hidden_state, theirs.last_hidden_state
    assert (ours - theirs).abs().max().item() < 1e-5
    assert (ours - base_only.last_hidden_state).abs().max().item() > 1e-3  # LoRA matters
    assert (projected[0] - projected[1]).abs().max().item() < 1e-6  # trained projector

    # Without the run's saved backbone the tiny base is rebuilt from config + seed, equal.
    moved = tmp_path / "export"
    shutil.copytree(out, moved)
    meta = read_json(moved / MARKER)
    meta["base_model"]["path"] = str(tmp_path / "gone")
    (moved / MARKER).write_text(json.dumps(meta))
    rebuilt = load_base_backbone(moved).state_dict()
    saved = plain.state_dict()
    assert rebuilt.keys() == saved.keys()
    assert all(torch.equal(rebuilt[k], saved[k]) for k in saved)

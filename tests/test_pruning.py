"""Fast tests of elmm_ray.pruning: importance, planning, physical removal, compensation,
save/reload (with LoRA and compensation), training after pruning, the pruner registry."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from elmm_ray.config import Config  # noqa: E402
from elmm_ray.data.collate import QueryCollator  # noqa: E402
from elmm_ray.data.image_features import FeatureBank  # noqa: E402
from elmm_ray.data.kg import FilterIndex  # noqa: E402
from elmm_ray.losses.knowledge import knowledge_loss  # noqa: E402
from elmm_ray.models.backbone import image_feature_shape  # noqa: E402
from elmm_ray.models.build import build_elmm, build_tokenizer  # noqa: E402
from elmm_ray.models.lora import apply_lora, load_trainable, merge_lora, save_trainable  # noqa: E402
from elmm_ray.models.pruned import (  # noqa: E402
    SPEC_FILE,
    is_pruned_backbone,
    load_pruned_backbone,
    load_pruned_weights,
    pruning_spec,
    save_pruned_backbone,
)
from elmm_ray.models.surgery import (  # noqa: E402
    LinearCompensation,
    decoder_layers,
    is_compensated,
    remove_kv_groups,
    remove_neurons,
)
from elmm_ray.pruning import PRUNERS, PruneOptions, Pruner, make_pruner  # noqa: E402
from elmm_ray.pruning.attention import (  # noqa: E402
    AttentionPruner,
    attention_similarity,
    collect_attention_io,
)
from elmm_ray.pruning.base import CalibrationData  # noqa: E402
from elmm_ray.pruning.compensation import (  # noqa: E402
    fit_compensation,
    reconstruction_errors,
)
from elmm_ray.pruning.structured import (  # noqa: E402
    knowledge_importance,
    layer_shapes,
    magnitude_importance,
    original_prunable_parameters,
    plan_removal,
    prunable_parameters,
    random_importance,
    remove_units,
    unit_costs,
)
from elmm_ray.train.step import compute_loss  # noqa: E402

ENTITY_TEXTS = [
    "paris , capital and largest city of france",
    "france , country in western europe",
    "the eiffel tower , wrought iron lattice tower in paris",
    "drama , film genre",
    "casablanca , 1942 american romantic drama film",
    "berlin , capital of germany",
    "germany , country in central europe",
    "comedy , film genre",
]
RELATION_TEXTS = ["located in", "genre", "capital of"]
NUM_RELATIONS = len(RELATION_TEXTS)
TRIPLES = np.array([[0, 0, 1], [2, 0, 0], [4, 1, 3], [5, 2, 6], [0, 2, 1], [5, 0, 6],
                    [2, 0, 1], [4, 0, 7]])
LORA_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)$"


def tiny_config(**model_overrides) -> Config:
    cfg = Config()
    sizes = dict(vision_hidden=32, vision_layers=1, vision_heads=4, image_size=32, patch_size=16,
                 llm_hidden=32, llm_layers=2, llm_heads=4, llm_kv_heads=2, llm_intermediate=48,
                 vocab_size=200, max_text_tokens=12)
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, **{**sizes, **model_overrides}),
        mvtc=dataclasses.replace(cfg.mvtc, n_visual=2, n_text=2, heads=4))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(tiny_config(), ENTITY_TEXTS + RELATION_TEXTS)


@pytest.fixture(scope="module")
def collator(tokenizer):
    return QueryCollator(tokenizer, ENTITY_TEXTS, RELATION_TEXTS, NUM_RELATIONS, 12)


def make_model(tokenizer, seed: int = 0, **overrides):
    cfg = dataclasses.replace(tiny_config(**overrides), seed=seed)
    return build_elmm(cfg, num_entities=len(ENTITY_TEXTS), tokenizer=tokenizer).eval()


def make_data(model, collator, batch_size: int = 4) -> CalibrationData:
    tokens, width = image_feature_shape(model.backbone)
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(len(ENTITY_TEXTS), 2, tokens, width, generator=generator).half()
    mask = torch.tensor([[True, True], [True, False]] * (len(ENTITY_TEXTS) // 2))
    queries = np.concatenate([TRIPLES, np.stack([TRIPLES[:, 2], TRIPLES[:, 1] + NUM_RELATIONS,
                                                 TRIPLES[:, 0]], axis=1)])
    return CalibrationData(collator, FeatureBank(features, mask), queries,
                           FilterIndex(TRIPLES, NUM_RELATIONS), batch_size=batch_size,
                           holdout=queries[:6])


@torch.no_grad()
def all_scores(model, data: CalibrationData) -> torch.Tensor:
    return torch.cat([model(batch) for batch, _ in data.batches()])


# --- importance -------------------------------------------------------------------------------


def _manual_grads(model, data, batch, chunk):
    layer = decoder_layers(model)[0]
    attn, mlp = layer.self_attn, layer.mlp
    params = {n: getattr(attn, n).weight for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    params |= {n: getattr(mlp, n).weight for n in ("gate_proj", "up_proj", "down_proj")}
    for p in params.values():
        p.requires_grad_(True)
    rows, cols = data.known.mask_pairs(chunk[:, 0], chunk[:, 1])
    loss = knowledge_loss(model.score(model.encode_queries(batch)), rows, cols)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    return params, grads


def _per_unit(params, values, head_dim=8, rep=2):
    """Hand aggregation of a per-weight tensor dict over KV groups and neurons (1 layer)."""
    heads = []
    for g in range(2):
        q_rows = slice(g * rep * head_dim, (g + 1) * rep * head_dim)
        kv_rows = slice(g * head_dim, (g + 1) * head_dim)
        heads.append(values["q_proj"][q_rows].sum() + values["k_proj"][kv_rows].sum()
                     + values["v_proj"][kv_rows].sum() + values["o_proj"][:, q_rows].sum())
    neurons = [values["gate_proj"][j].sum() + values["up_proj"][j].sum()
               + values["down_proj"][:, j].sum() for j in range(params["gate_proj"].shape[0])]
    return torch.stack(heads), torch.stack(neurons)


def test_knowledge_importance_matches_hand_computed_gradients(tokenizer, collator):
    model = make_model(tokenizer, llm_layers=1)
    data = make_data(model, collator)
    n = len(data.queries)
    flags = [p.requires_grad for p in model.parameters()]
    # one mini-batch holding every query: I(u) = sum_w (dL/dw)^2
    squared = knowledge_importance(model, data, form="squared", batch_size=n)
    taylor = knowledge_importance(model, data, form="taylor", batch_size=n)
    assert [p.requires_grad for p in model.parameters()] == flags  # left as they were
    batch, chunk = next(data.batches(batch_size=n))
    params, grads = _manual_grads(model, data, batch, chunk)
    heads, neurons = _per_unit(params, {k: g.square() for k, g in grads.items()})
    assert torch.allclose(squared.heads[0], heads, rtol=1e-4)
    assert torch.allclose(squared.neurons[0], neurons, rtol=1e-4, atol=1e-12)
    heads, neurons = _per_unit(params, {k: (params[k] * g).abs() for k, g in grads.items()})
    assert torch.allclose(taylor.heads[0], heads.detach(), rtol=1e-4)
    assert torch.allclose(taylor.neurons[0], neurons.detach(), rtol=1e-4, atol=1e-12)
    # mini-batches of 4: the mean over mini-batches of the squared mini-batch gradients
    mini = knowledge_importance(model, data, form="squared", batch_size=4)
    expected_heads, expected_neurons = 0, 0
    for batch, chunk in data.batches(batch_size=4):
        params, grads = _manual_grads(model, data, batch, chunk)
        h, m = _per_unit(params, {k: g.square() for k, g in grads.items()})
        expected_heads, expected_neurons = expected_heads + h, expected_neurons + m
    batches = -(-n // 4)
    assert torch.allclose(mini.heads[0], expected_heads / batches, rtol=1e-4)
    assert torch.allclose(mini.neurons[0], expected_neurons / batches, rtol=1e-4, atol=1e-12)


def test_magnitude_and_random_importance(tokenizer):
    model = make_model(tokenizer)
    mags = magnitude_importance(model)
    mlp = decoder_layers(model)[1].mlp
    expected = torch.sqrt(mlp.gate_proj.weight[3].square().sum() + mlp.up_proj.weight[3].square()
                          .sum() + mlp.down_proj.weight[:, 3].square().sum())
    assert torch.isclose(mags.neurons[1][3], expected.detach())
    costs = unit_costs(model)
    d, head_dim = 32, 8
    assert costs.heads[0].tolist() == [d * head_dim * (2 * 2 + 2)] * 2
    assert costs.neurons[0].tolist() == [3 * d] * 48
    a, b = random_importance(model, 1), random_importance(model, 1)
    assert torch.equal(a.neurons[0], b.neurons[0])
    assert not torch.equal(a.neurons[0], random_importance(model, 2).neurons[0])


# --- planning ---------------------------------------------------------------------------------


def test_plan_reaches_the_ratio_and_respects_the_minimums(tokenizer):
    model = make_model(tokenizer, llm_layers=3, llm_intermediate=64)
    scores = magnitude_importance(model)
    original = original_prunable_parameters(model)
    assert prunable_parameters(model) == original
    for scope in ("global", "per_layer"):
        plan = plan_removal(model, scores, 0.3, scope=scope, min_heads_per_layer=1,
                            min_neurons_per_layer=8)
        assert abs(plan.removed_params - 0.3 * original) <= 3 * 3 * 32  # a neuron per layer
        assert all(len(v) <= 1 for v in plan.heads.values())  # 2 kv groups, keep >= 1
        assert all(64 - len(v) >= 8 for v in plan.neurons.values())
    # the lowest-scoring neurons go first
    scores.neurons = {k: torch.arange(64, dtype=torch.float32) + 1 for k in range(3)}
    scores.heads = {k: torch.full((2,), 1e6) for k in range(3)}
    plan = plan_removal(model, scores, 0.1, scope="per_layer", min_neurons_per_layer=8)
    for neurons in plan.neurons.values():
        assert neurons == list(range(len(neurons)))
    # a huge ratio stops at the minimums
    plan = plan_removal(model, scores, 0.99, min_heads_per_layer=1, min_neurons_per_layer=8)
    remove_units(model, plan.heads, plan.neurons)
    assert all(s["kv_heads"] == 1 and s["neurons"] == 8 for s in layer_shapes(model))


# --- physical removal -------------------------------------------------------------------------


def test_removing_zeroed_units_keeps_the_scores(tokenizer, collator):
    model = make_model(tokenizer)
    data = make_data(model, collator)
    layers = decoder_layers(model)
    with torch.no_grad():
        # KV group 1 of layer 0 contributes nothing once its o_proj columns are zero
        layers[0].self_attn.o_proj.weight[:, 16:32] = 0
        for j in (0, 5, 7, 40):
            layers[1].mlp.down_proj.weight[:, j] = 0
    before = all_scores(model, data)
    remove_units(model, {0: [1]}, {1: [0, 5, 7, 40]})
    after = all_scores(model, data)
    assert torch.allclose(before, after, atol=1e-5)
    assert layer_shapes(model)[0] == {"heads": 2, "kv_heads": 1, "neurons": 48,
                                      "compensated": False}
    assert layer_shapes(model)[1]["neurons"] == 44
    assert decoder_layers(model)[1].mlp.down_proj.weight.shape == (32, 44)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (8, 2)])
def test_gqa_group_removal_keeps_shapes_valid(tokenizer, collator, heads, kv_heads):
    model = make_model(tokenizer, llm_heads=heads, llm_kv_heads=kv_heads)
    data = make_data(model, collator)
    attn = decoder_layers(model)[0].self_attn
    head_dim, rep = 32 // heads, heads // kv_heads
    remove_kv_groups(attn, [0])
    assert attn.q_proj.weight.shape == ((kv_heads - 1) * rep * head_dim, 32)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == ((kv_heads - 1) * head_dim, 32)
    assert attn.o_proj.weight.shape == (32, (kv_heads - 1) * rep * head_dim)
    assert attn.num_key_value_groups == rep and attn.head_dim == head_dim
    assert attn.num_heads == (kv_heads - 1) * rep
    scores = all_scores(model, data)
    assert scores.shape == (len(data.queries), len(ENTITY_TEXTS)) and torch.isfinite(scores).all()
    with pytest.raises(ValueError, match="every KV group"):
        remove_kv_groups(attn, list(range(kv_heads - 1)))


def test_structured_pruning_refuses_lora_wrapped_layers(tokenizer):
    model = make_model(tokenizer)
    apply_lora(model, r=2, alpha=4, dropout=0.0, target_regex=LORA_REGEX)
    with pytest.raises(ValueError, match="merge LoRA"):
        remove_units(model, {0: [0]}, {})
    remove_neurons(decoder_layers(model)[0].mlp, [1, 2])  # MLP has no adapter here
    merge_lora(model)
    remove_units(model, {0: [0]}, {})


# --- compensation -----------------------------------------------------------------------------


def test_compensation_fit_recovers_a_known_linear_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 16, generator=g)
    w_true = torch.eye(16) + 0.3 * torch.randn(16, 16, generator=g)
    b_true = torch.randn(16, generator=g)
    y = x @ w_true + b_true
    fit = fit_compensation(x, y, ridge=0.0)
    assert torch.allclose(fit.weight, w_true, atol=1e-4)
    assert torch.allclose(fit.bias, b_true, atol=1e-4)
    errors = reconstruction_errors(x, y, fit)
    assert errors["compensated_fro"] < 1e-3 * errors["removal_fro"]
    assert errors["reduction"] > 0.999
    no_bias = fit_compensation(x, x @ w_true, ridge=0.0, bias=False)
    assert no_bias.bias is None and torch.allclose(no_bias.weight, w_true, atol=1e-4)
    # the ridge pulls W towards the identity (plain removal)
    shrunk = fit_compensation(x, y, ridge=1.0)
    assert shrunk.delta.norm() < fit.delta.norm()
    # low rank: W = I + A B of rank 3 is recovered exactly by a rank-3 fit
    a, b = torch.randn(16, 3, generator=g), torch.randn(3, 16, generator=g)
    y_low = x @ (torch.eye(16) + a @ b) + b_true
    low = fit_compensation(x, y_low, ridge=0.0, rank=3)
    assert low.rank == 3 and low.down.shape == (16, 3) and low.up.shape == (3, 16)
    assert torch.allclose(low.weight, torch.eye(16) + a @ b, atol=1e-3)
    worse = fit_compensation(x, y, ridge=0.0, rank=2)  # a full-rank map loses with rank 2
    assert reconstruction_errors(x, y, worse)["compensated_fro"] > errors["compensated_fro"]
    # the module computes h @ (W - I) + b so that the decoder's residual gives h @ W + b
    module = LinearCompensation(16, rank=3)
    module.load_fit(low)
    out, none = module(x, attention_mask=None, position_embeddings=None)
    assert none is None and torch.allclose(x + out, low.predict(x), atol=1e-5)


def test_attention_pruning_replaces_layers_bottom_up(tokenizer, collator):
    model = make_model(tokenizer, llm_layers=3)
    data = make_data(model, collator)
    similarity = attention_similarity(model, data)
    assert len(similarity) == 3 and all(-1 <= s <= 1 for s in similarity)
    pruner = AttentionPruner(PruneOptions(compensation_rank=0, ridge=1e-4))
    plan = pruner.plan(model, similarity, 0.6)  # round(0.6 * 3) = 2 most similar layers
    assert plan.layers == sorted(np.argsort(similarity)[::-1][:2].tolist())
    threshold = AttentionPruner(PruneOptions(threshold=min(similarity) - 1e-6))
    assert threshold.plan(model, similarity, 0.0).layers == [0, 1, 2]
    report = pruner.apply(model, plan, data)
    for index in plan.layers:
        assert is_compensated(decoder_layers(model)[index])
    for layer in report["layers"]:
        errors = layer["errors"]
        # the ridge solution never does worse than plain removal on its own data
        assert errors["compensated_fro"] <= errors["removal_fro"] + 1e-6
        assert "holdout_errors" in layer
    # the compensated layer really computes h @ W + b
    index = plan.layers[-1]
    inputs, outputs = collect_attention_io(model, data, index)
    module = decoder_layers(model)[index].self_attn
    expected = inputs @ module.weight.detach() + module.bias.detach()
    assert torch.allclose(outputs, expected, atol=1e-4)
    assert all(p.requires_grad for p in module.parameters())
    assert attention_similarity(model, data)[index] is None
    assert torch.isfinite(all_scores(model, data)).all()


# --- save / reload ----------------------------------------------------------------------------


def _pruned_lora_model(tokenizer, collator, seed: int = 0):
    model = make_model(tokenizer, llm_layers=3, seed=seed)
    data = make_data(model, collator)
    AttentionPruner(PruneOptions(compensation_rank=4)).prune(model, data, 0.34)
    make_pruner("knowledge", PruneOptions(min_neurons_per_layer=4)).prune(model, data, 0.3)
    apply_lora(model, r=2, alpha=4, dropout=0.0, target_regex=LORA_REGEX)
    for module in model.modules():
        if isinstance(module, LinearCompensation):
            module.requires_grad_(True)
    with torch.no_grad():  # make adapters and heads non-trivial
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if ".lora_" in name or ".self_attn.up" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model, data


def test_pruned_lora_compensated_model_saves_and_reloads(tokenizer, collator, tmp_path):
    model, data = _pruned_lora_model(tokenizer, collator)
    expected = all_scores(model, data)
    save_pruned_backbone(model, tmp_path / "backbone", extra={"note": "test"})
    save_trainable(model, tmp_path)
    assert is_pruned_backbone(tmp_path / "backbone")
    spec = json.loads((tmp_path / "backbone" / SPEC_FILE).read_text())
    assert spec == pruning_spec(model) | {"aliases": spec["aliases"], "extra": {"note": "test"}}
    assert len(spec["removed_attention_layers"]) == 1
    assert spec["layers"][spec["removed_attention_layers"][0]]["compensation"] == {
        "rank": 4, "bias": True, "context": False}
    manifest = json.loads((tmp_path / "trainable.json").read_text())
    assert any(".self_attn.down" in name for name in manifest["trainable"])

    fresh = make_model(tokenizer, llm_layers=3, seed=0)
    load_pruned_weights(fresh, tmp_path / "backbone")
    load_trainable(fresh, tmp_path)
    fresh.eval()
    assert torch.equal(all_scores(fresh, data), expected)
    assert pruning_spec(fresh)["layers"] == spec["layers"]

    # the standalone loader gives the same backbone (LoRA merged out of the comparison)
    backbone = load_pruned_backbone(tmp_path / "backbone")
    merge_lora(fresh)
    reference = fresh.backbone
    embeds = torch.randn(2, 5, 32)
    with torch.no_grad():
        a = reference.model.language_model(inputs_embeds=embeds).last_hidden_state
        fresh_backbone = make_model(tokenizer, llm_layers=3, seed=5)
        load_pruned_weights(fresh_backbone, tmp_path / "backbone")
        b = backbone.model.language_model(inputs_embeds=embeds).last_hidden_state
        c = fresh_backbone.backbone.model.language_model(inputs_embeds=embeds).last_hidden_state
    assert torch.equal(b, c)
    assert a.shape == b.shape
    with pytest.raises(ValueError, match="does not fit|before LoRA"):
        other = make_model(tokenizer, llm_layers=3)
        apply_lora(other, r=2, alpha=4, dropout=0.0, target_regex=LORA_REGEX)
        load_pruned_weights(other, tmp_path / "backbone")


# --- training after pruning, registry ---------------------------------------------------------


def test_a_pruned_model_with_lora_trains(tokenizer, collator):
    model, data = _pruned_lora_model(tokenizer, collator, seed=3)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert any(p.ndim == 2 and p.shape[1] == 4 for p in params)  # the compensation's down
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    queries = torch.as_tensor(data.queries[:8])
    losses = []
    for _ in range(6):
        parts = compute_loss(model, data.collator, data.features, queries, data.known,
                             num_negatives=0, knowledge_weight=0.5)
        optimizer.zero_grad()
        parts.loss.backward()
        optimizer.step()
        losses.append(float(parts.loss.detach()))
    assert losses[-1] < losses[0]


def test_every_pruner_has_the_same_interface(tokenizer, collator):
    assert set(PRUNERS) == {"attention", "knowledge", "magnitude", "random"}
    for name, cls in PRUNERS.items():
        model = make_model(tokenizer, llm_layers=2)
        data = make_data(model, collator)
        pruner = make_pruner(name, PruneOptions(seed=1, min_neurons_per_layer=4))
        assert isinstance(pruner, Pruner) and isinstance(pruner, cls) and pruner.name == name
        before = prunable_parameters(model)
        report = pruner.prune(model, data, 0.5)
        assert report["method"] == name and report["amount"] == 0.5
        json.dumps(report)  # JSON-able
        assert prunable_parameters(model) < before
        assert torch.isfinite(all_scores(model, data)).all()
    with pytest.raises(ValueError, match="unknown pruning method"):
        make_pruner("nope")
    with pytest.raises(ValueError, match="scope"):
        PruneOptions(scope="everywhere")


# --- the stage --------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_prune_stage_prunes_finetunes_saves_and_reloads(tmp_path):
    from elmm_ray.config import load_config
    from elmm_ray.data.dataset import load_dataset
    from elmm_ray.eval.evaluate import evaluate_model
    from elmm_ray.layout import absolute_paths
    from elmm_ray.stages import run_stage, run_stages
    from elmm_ray.train.context import load_pruned_context

    overrides = [
        f"run_dir={tmp_path / 'run'}", "train.backend=local", "dataset.synth.num_entities=40",
        "dataset.synth.min_images=0", "dataset.synth.max_images=0",
        "images.max_images_per_entity=0", "model.llm_hidden=32", "model.llm_layers=2",
        "model.llm_heads=4", "model.llm_kv_heads=2", "model.llm_intermediate=64",
        "model.vision_hidden=32", "model.vocab_size=300", "mvtc.n_visual=2", "mvtc.n_text=2",
        "train.max_steps=4", "train.global_batch_size=16", "train.val_max_queries=10",
        "prune.method=knowledge", "prune.ratio=0.3", "prune.steps=2", "prune.finetune_steps=2",
        "prune.calib_samples=8", "prune.min_neurons_per_layer=4",
    ]
    cfg = absolute_paths(load_config(None, overrides))
    run_stage("synth", cfg)
    kg = load_dataset(cfg)
    # A fresh run directory: `prune` runs the upstream stages it needs (synth, pack, train).
    results = run_stages(["prune"], cfg, show_progress=False, kg=kg)
    assert list(results) == ["synth", "pack", "train", "prune"]
    assert results["synth"].skipped and not results["prune"].skipped
    run = tmp_path / "run" / "prune"
    payload = json.loads((run / "prune_report.json").read_text())
    for name in ("prune_report.md", "prune_report.json", "prune_report.png",
                 "model/backbone/pruning.json", "model/trainable.json",
                 "finetune_1/summary.json", "finetune_2/summary.json"):
        assert (run / name).is_file(), name
    pruned = payload["runs"][1]
    assert pruned["method"] == "knowledge" and abs(pruned["removed_share"] - 0.3) < 0.02
    assert [r["amount"] for r in payload["rounds"]] == [0.15, 0.3]
    assert pruned["llm_params"] < payload["runs"][0]["llm_params"]
    assert "| knowledge | 30% |" in (run / "prune_report.md").read_text()
    ctx = load_pruned_context(cfg, kg)
    metrics = evaluate_model(ctx.model, ctx.collator, ctx.features, kg, split=cfg.eval.split)
    assert metrics["overall"]["mrr"] == pytest.approx(pruned["post_ft"]["mrr"], abs=1e-12)
    assert results["prune"].manifest["post_ft"] == pruned["post_ft"]
    again = run_stage("prune", cfg, show_progress=False, kg=kg)  # complete: skipped
    assert again.skipped and again.manifest["fingerprint"] == results["prune"].manifest[
        "fingerprint"]


def test_measurements_and_report(tokenizer, collator, tmp_path):
    import copy

    from elmm_ray.pruning.report import summarise, timing_batches, write_report
    from elmm_ray.stages.prune import measure

    model = make_model(tokenizer, llm_intermediate=256)
    data = make_data(model, collator)
    pruned = copy.deepcopy(model)
    make_pruner("magnitude", PruneOptions()).prune(pruned, data, 0.5)
    attention = copy.deepcopy(model)
    report = make_pruner("attention", PruneOptions()).prune(attention, data, 0.5)
    batches = timing_batches(collator, data.features, data.queries, 4, 2)
    measured = measure({"base": model, "pruned": pruned}, batches, repeats=2, base="base")
    base, small = measured["base"], measured["pruned"]
    assert small["llm_params"] < base["llm_params"] and small["total_params"] < base["total_params"]
    assert base["speedup"] == 1.0 and small["speedup"] > 0 and len(small["cpu_runs_ms"]) == 2
    assert 0 < small["peak_mem_mb"] < base["peak_mem_mb"]  # smaller MLP activations
    metrics = {"mrr": 0.5, "hits@1": 0.4, "type_violation": 0.1}
    runs = [{"method": "none", "ratio": 0.0, "seed": 0, **base, "pre_ft": metrics,
             "post_ft": metrics, "retained_hits1": 1.0}]
    for seed, hits in ((0, 0.3), (1, 0.2)):
        after = {**metrics, "hits@1": hits}
        runs.append({"method": "magnitude", "ratio": 0.5, "seed": seed, **small,
                     "pre_ft": metrics, "post_ft": after, "retained_hits1": hits / 0.4})
    runs.append({"method": "attention", "ratio": 0.5, "seed": 0, **small, "label": "1/2 layers",
                 "pre_ft": metrics, "post_ft": metrics, "retained_hits1": 1.0})
    rows = summarise(runs)
    assert [r["method"] for r in rows] == ["none", "magnitude", "attention"]
    assert rows[1]["runs"] == 2 and rows[1]["post_ft"]["hits@1"] == pytest.approx(0.25)
    assert rows[1]["post_ft"]["hits@1_std"] == pytest.approx(np.std([0.3, 0.2], ddof=1))
    paths = write_report(tmp_path, {"rows": rows, "runs": runs, "attention": [
        {"label": "test", "layers": report["layers"]}], "notes": ["a note"]})
    text = paths["md"].read_text()
    assert "| magnitude | 50% |" in text and "| attention | 1/2 layers |" in text
    assert "0.250 ± 0.071" in text and "Reduction (MSE)" in text and "- a note" in text
    assert paths["png"].stat().st_size > 1000
    assert json.loads(paths["json"].read_text())["rows"][1]["method"] == "magnitude"

"""Fast tests of the token-mixing compensation (``prune.compensation = linear_mean``): the
fit recovers a known map, a pruned model computes what was fitted, save/reload."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from elmm_ray.data.collate import QueryCollator  # noqa: E402
from elmm_ray.integrity import record_checksums  # noqa: E402
from elmm_ray.models.build import build_tokenizer  # noqa: E402
from elmm_ray.models.lora import load_trainable  # noqa: E402
from elmm_ray.models.pruned import (  # noqa: E402
    MODEL_BACKBONE_SUBDIR,
    SPEC_FILE,
    load_pruned_weights,
    pruning_spec,
    save_pruned_backbone,
    save_pruned_model,
)
from elmm_ray.models.surgery import (  # noqa: E402
    LinearCompensation,
    causal_mean,
    decoder_layers,
    is_compensated,
)
from elmm_ray.pruning import PruneOptions  # noqa: E402
from elmm_ray.pruning.attention import AttentionPruner, collect_layer_io  # noqa: E402
from elmm_ray.pruning.compensation import fit_compensation, reconstruction_errors  # noqa: E402
from tests import test_pruning as tp  # noqa: E402
from tests.test_pruning import all_scores, make_data, make_model  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(tp.tiny_config(), tp.ENTITY_TEXTS + tp.RELATION_TEXTS)


@pytest.fixture(scope="module")
def collator(tokenizer):
    return QueryCollator(tokenizer, tp.ENTITY_TEXTS, tp.RELATION_TEXTS, tp.NUM_RELATIONS, 12)


def _sequences(seed: int = 0, batch: int = 40, length: int = 12, dim: int = 16):
    g = torch.Generator().manual_seed(seed)
    return g, torch.randn(batch, length, dim, generator=g)


def test_causal_mean_is_the_running_mean():
    _, h = _sequences(batch=2, length=5, dim=3)
    mean = causal_mean(h)
    for t in range(5):
        assert torch.allclose(mean[:, t], h[:, : t + 1].mean(dim=1), atol=1e-6)


def test_context_fit_recovers_a_known_token_mixing_map():
    g, h = _sequences()
    dim = h.shape[-1]
    w_true = torch.eye(dim) + 0.3 * torch.randn(dim, dim, generator=g)
    c_true = 0.5 * torch.randn(dim, dim, generator=g)
    b_true = torch.randn(dim, generator=g)
    mean = causal_mean(h)
    y = h @ w_true + mean @ c_true + b_true
    x, m, y = h.reshape(-1, dim), mean.reshape(-1, dim), y.reshape(-1, dim)
    fit = fit_compensation(x, y, ridge=0.0, context=m)
    assert fit.uses_context
    assert torch.allclose(fit.weight, w_true, atol=1e-3)
    assert torch.allclose(fit.context, c_true, atol=1e-3)
    assert torch.allclose(fit.bias, b_true, atol=1e-3)
    assert reconstruction_errors(x, y, fit, m)["reduction"] > 0.999
    # the own-state map alone cannot express the mixing
    own = fit_compensation(x, y, ridge=0.0)
    assert reconstruction_errors(x, y, own)["reduction"] < 0.9
    with pytest.raises(ValueError, match="causal running means"):
        fit.predict(x)
    # the module on whole sequences: h + out == the fit's prediction on every position
    module = LinearCompensation(dim, context=True)
    module.load_fit(fit)
    out, none = module(h, attention_mask=None)
    assert none is None
    assert torch.allclose((h + out).reshape(-1, dim), fit.predict(x, m), atol=1e-4)
    with pytest.raises(ValueError, match="does not match"):
        LinearCompensation(dim).load_fit(fit)


def test_low_rank_context_fit_shares_the_output_basis():
    g, h = _sequences(seed=1)
    dim, rank = h.shape[-1], 3
    up = torch.randn(rank, dim, generator=g)
    d_true = torch.randn(dim, rank, generator=g) @ up
    c_true = torch.randn(dim, rank, generator=g) @ up
    mean = causal_mean(h)
    y = h + h @ d_true + mean @ c_true
    x, m, y = h.reshape(-1, dim), mean.reshape(-1, dim), y.reshape(-1, dim)
    fit = fit_compensation(x, y, ridge=0.0, rank=rank, context=m)
    assert fit.down.shape == fit.context_down.shape == (dim, rank)
    assert torch.allclose(fit.delta, d_true, atol=1e-3)
    assert torch.allclose(fit.context, c_true, atol=1e-3)
    module = LinearCompensation(dim, rank=rank, context=True)
    module.load_fit(fit)
    assert torch.allclose(module.context_matrix(), c_true, atol=1e-3)
    out, _ = module(h)
    assert torch.allclose((h + out).reshape(-1, dim), fit.predict(x, m), atol=1e-4)


def _pruned(tokenizer, collator, rank: int = 0, compensation: str = "linear_mean", ridge=1e-4):
    model = make_model(tokenizer, llm_layers=3)
    data = make_data(model, collator)
    pruner = AttentionPruner(PruneOptions(compensation_rank=rank, ridge=ridge,
                                          compensation=compensation))
    report = pruner.prune(model, data, 0.67)
    return model, data, report


def test_pruned_model_uses_the_token_mixing_map(tokenizer, collator):
    model, data, report = _pruned(tokenizer, collator)
    assert report["compensation"] == "linear_mean" and len(report["pruned_layers"]) == 2
    for index in report["pruned_layers"]:
        layer = decoder_layers(model)[index]
        assert is_compensated(layer) and layer.self_attn.uses_context
        # the layer, run inside the model (padding included), computes h W + mean C + b on
        # the real positions, the running mean taken over the real tokens only
        io = collect_layer_io(model, data, index, context=True)
        module = layer.self_attn
        expected = (io.inputs @ module.weight.detach() + io.context @ module.context.detach()
                    + module.bias.detach())
        assert torch.allclose(io.outputs, expected, atol=1e-4)
    for record in report["layers"]:
        assert record["errors"]["compensated_fro"] <= record["errors"]["removal_fro"]
        assert "holdout_errors" in record
    # on its own calibration data (no ridge) the richer family is never worse
    _, _, linear = _pruned(tokenizer, collator, compensation="linear", ridge=0.0)
    _, _, mixed = _pruned(tokenizer, collator, ridge=0.0)
    first = linear["pruned_layers"][0]
    assert mixed["pruned_layers"][0] == first
    assert (mixed["layers"][0]["errors"]["compensated_fro"]
            <= linear["layers"][0]["errors"]["compensated_fro"] + 1e-5)


@pytest.mark.parametrize("rank", [0, 4])
def test_token_mixing_compensation_saves_and_reloads(tokenizer, collator, tmp_path, rank):
    model, data, report = _pruned(tokenizer, collator, rank=rank)
    expected = all_scores(model, data)
    save_pruned_model(model, tmp_path)
    backbone = tmp_path / MODEL_BACKBONE_SUBDIR
    spec = json.loads((backbone / SPEC_FILE).read_text())
    entry = spec["layers"][report["pruned_layers"][0]]
    assert entry["compensation"] == {"rank": rank, "bias": True, "context": True}
    fresh = make_model(tokenizer, llm_layers=3, seed=7)
    load_pruned_weights(fresh, backbone)
    load_trainable(fresh, tmp_path)
    assert pruning_spec(fresh)["layers"] == spec["layers"]
    assert torch.equal(all_scores(fresh.eval(), data), expected)


def test_spec_without_context_key_loads_as_the_linear_map(tokenizer, collator, tmp_path):
    model, data, report = _pruned(tokenizer, collator, compensation="linear")
    expected = all_scores(model, data)
    save_pruned_backbone(model, tmp_path)
    spec = json.loads((tmp_path / SPEC_FILE).read_text())
    for entry in spec["layers"]:  # as written before token mixing existed
        if entry["compensation"]:
            del entry["compensation"]["context"]
    (tmp_path / SPEC_FILE).write_text(json.dumps(spec))
    record_checksums(tmp_path)
    fresh = make_model(tokenizer, llm_layers=3, seed=0)  # same heads; backbone from the file
    load_pruned_weights(fresh, tmp_path)
    assert not any(m.uses_context for m in fresh.modules() if isinstance(m, LinearCompensation))
    assert torch.equal(all_scores(fresh.eval(), data), expected)

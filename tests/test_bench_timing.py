"""The measuring tools of the speed benchmarks (bench/encode_timing.py): FLOP counts that
match the model's shapes, and a phase profile that leaves the model as it found it."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from encode_timing import (  # noqa: E402
    PHASES,
    SHAPES,
    PhaseTimer,
    build_models,
    count_flops,
    interleaved,
)


def _llm_flops(model, batch) -> tuple[int, int]:
    """Projection FLOPs and all LLM FLOPs of one pass, from the shapes (padded prompt)."""
    with torch.no_grad():
        embeds, _, _ = model.build_prompt(batch)
    rows, length, hidden = embeds.shape
    layers = model.language_model.layers
    weights = sum(m.weight.numel() for layer in layers for m in layer.modules()
                  if isinstance(m, torch.nn.Linear))
    projections = 2 * weights * rows * length
    attention = 4 * rows * length * length * hidden * len(layers)  # scores + mixing
    return projections, projections + attention


def test_flops_match_the_shapes_and_mvtc_needs_fewer():
    models, batch = build_models(SHAPES["quick"], 16, 10, 2)
    counted = {name: count_flops(m, batch) for name, m in models.items()}
    for name, model in models.items():
        projections, llm = _llm_flops(model, batch)
        assert counted[name]["prunable"] == projections, name
        assert counted[name]["llm"] == llm, name  # CPU flash attention is counted too
    assert counted["uncompressed"]["mvtc"] == 0 < counted["mvtc"]["mvtc"]
    assert counted["mvtc"]["total"] < counted["uncompressed"]["total"]


def test_phase_timer_profiles_and_restores_the_model():
    models, batch = build_models(SHAPES["quick"], 16, 10, 2)
    model = models["mvtc"]
    timing = interleaved(models, batch, repeats=1)
    phases = timing["mvtc"]["phase_median"]
    assert set(phases) == set(PHASES)
    assert all(phases[p] > 0 for p in ("mvtc", "projector", "embedding", "llm", "readout"))
    assert timing["uncompressed"]["phase_median"]["mvtc"] == 0
    assert abs(sum(phases.values()) - timing["mvtc"]["cpu_median"]) < 1e-9
    with PhaseTimer(model):
        assert "build_prompt" in vars(model)
    assert "build_prompt" not in vars(model)
    assert not model.mvtc._forward_hooks and not model.language_model._forward_pre_hooks

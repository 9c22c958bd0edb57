"""Attention-layer pruning with linear compensation (ELMM).

Redundancy of layer ``l``: the mean cosine similarity, over the real (non-padding) token
positions of the calibration queries, between the hidden state entering the layer ``h``
and the state after its attention sublayer ``h + attn(norm(h))``. The most redundant
layers (similarity above ``threshold``, or the top ``amount`` share of the layers) lose
their attention sublayer. Going bottom-up, each chosen layer's calibration states are
recomputed with the layers below already pruned, a map ``W`` is fitted by ridge least
squares from ``h`` to ``h + attn(norm(h))`` (:func:`fit_compensation`), and the sublayer
is replaced by :class:`LinearCompensation` (the MLP sublayer stays). With
``compensation = "linear_mean"`` the map also reads the causal running mean of the states
(token mixing, see :mod:`elmm_ray.models.surgery`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from elmm_ray.models.elmm import ELMM
from elmm_ray.models.surgery import (
    LinearCompensation,
    causal_mean,
    decoder_layers,
    is_compensated,
    replace_attention,
)
from elmm_ray.pruning.base import CalibrationData, Pruner, model_device
from elmm_ray.pruning.compensation import (
    fit_compensation,
    reconstruction_errors,
)


def _attention_params(layer: nn.Module) -> int:
    modules = [layer.self_attn, layer.input_layernorm]
    return sum(p.numel() for m in modules for p in m.parameters())


@torch.no_grad()
def _run_language_model(model: ELMM, batch: dict[str, torch.Tensor], holder: dict) -> None:
    embeds, mask, _ = model.build_prompt(batch)
    holder["mask"] = mask
    model.language_model(inputs_embeds=embeds.to(model.input_embeddings.weight.dtype),
                         attention_mask=mask.long())


def _hook_layers(model: ELMM, layers: Sequence[int], on_pair, holder: dict,
                 context: bool = False) -> list:
    """Hooks calling ``on_pair(index, h_in, h_mid)`` on the real positions of each layer
    (``on_pair(index, h_in, h_mid, mean)`` with ``context``: ``mean`` the causal running
    mean of ``h_in``, taken before the padding is dropped)."""
    handles = []
    for index in layers:
        layer = decoder_layers(model)[index]
        state: dict = {}

        def pre_hook(module, args, kwargs, state=state):
            state["h"] = args[0] if args else kwargs["hidden_states"]

        def attn_hook(module, args, output, state=state, index=index):
            mask = holder["mask"]
            h_in = state.pop("h")
            pair = (h_in[mask].float(), (h_in + output[0])[mask].float())
            if context:
                on_pair(index, *pair, causal_mean(h_in)[mask].float())
            else:
                on_pair(index, *pair)

        handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(attn_hook))
    return handles


@torch.no_grad()
def attention_similarity(model: ELMM, data: CalibrationData) -> list[float | None]:
    """Mean cosine similarity of ``h`` and ``h + attn(norm(h))`` per layer (``None`` for a
    layer whose attention is already replaced)."""
    layers = [i for i, layer in enumerate(decoder_layers(model)) if not is_compensated(layer)]
    sums = dict.fromkeys(layers, 0.0)
    counts = dict.fromkeys(layers, 0)

    def on_pair(index: int, h_in: torch.Tensor, h_mid: torch.Tensor) -> None:
        sums[index] += float(F.cosine_similarity(h_in, h_mid, dim=-1).sum())
        counts[index] += h_in.shape[0]

    holder: dict = {}
    handles = _hook_layers(model, layers, on_pair, holder)
    try:
        for batch, _ in data.batches(device=model_device(model)):
            _run_language_model(model, batch, holder)
    finally:
        for handle in handles:
            handle.remove()
    return [sums[i] / max(1, counts[i]) if i in sums else None
            for i in range(len(decoder_layers(model)))]


class AttentionIO(NamedTuple):
    """Calibration states of one layer at every real position, ``(N, d)`` float32 CPU:
    ``h``, ``h + attn(norm(h))`` and (``None`` unless asked for) the causal running mean of
    ``h``."""

    inputs: torch.Tensor
    outputs: torch.Tensor
    context: torch.Tensor | None = None


@torch.no_grad()
def collect_layers_io(model: ELMM, data: CalibrationData, layers: Sequence[int],
                      queries: np.ndarray | None = None, context: bool = False
                      ) -> dict[int, AttentionIO]:
    """The :class:`AttentionIO` of each of ``layers`` on ``queries`` (default: the calibration
    ones), from one pass over the data."""
    parts: dict[int, list[tuple[torch.Tensor, ...]]] = {int(i): [] for i in layers}

    def on_pair(index: int, *tensors: torch.Tensor) -> None:
        parts[index].append(tuple(t.cpu() for t in tensors))

    holder: dict = {}
    handles = _hook_layers(model, list(parts), on_pair, holder, context=context)
    try:
        for batch, _ in data.batches(queries, device=model_device(model)):
            _run_language_model(model, batch, holder)
    finally:
        for handle in handles:
            handle.remove()
    return {i: AttentionIO(*[torch.cat(column) for column in zip(*rows)])
            for i, rows in parts.items()}


def collect_layer_io(model: ELMM, data: CalibrationData, layer: int,
                     queries: np.ndarray | None = None, context: bool = False) -> AttentionIO:
    """The :class:`AttentionIO` of ``layer`` on ``queries`` (default: the calibration ones)."""
    return collect_layers_io(model, data, [layer], queries, context)[layer]


def collect_attention_io(model: ELMM, data: CalibrationData, layer: int,
                         queries: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, h + attn(norm(h)))`` of ``layer`` at every real position, ``(N, d)`` float32 CPU."""
    io = collect_layer_io(model, data, layer, queries)
    return io.inputs, io.outputs


@dataclass
class AttentionPlan:
    """Layers whose attention sublayer goes, chosen by ``mode`` (``ratio``/``threshold``)."""

    layers: list[int]
    similarity: list[float | None]
    mode: str = "ratio"
    amount: float = 0.0


class AttentionPruner(Pruner):
    """ELMM attention-layer pruning: similarity -> chosen layers -> compensated layers."""

    name = "attention"

    def score(self, model: ELMM, data: CalibrationData) -> list[float | None]:
        return attention_similarity(model, data)

    def plan(self, model: ELMM, scores: list[float | None], amount: float) -> AttentionPlan:
        """Top ``amount`` share of all layers by similarity, or (``amount = 0``) every layer
        above ``options.threshold``. Already-replaced layers are never chosen again."""
        candidates = [(s, i) for i, s in enumerate(scores) if s is not None]
        if amount > 0:
            count = min(len(candidates), int(round(amount * len(scores))))
            chosen = [i for _, i in sorted(candidates, key=lambda t: (-t[0], t[1]))[:count]]
            return AttentionPlan(sorted(chosen), list(scores), "ratio", float(amount))
        chosen = [i for s, i in candidates if s > self.options.threshold]
        return AttentionPlan(sorted(chosen), list(scores), "threshold",
                             float(self.options.threshold))

    def apply(self, model: ELMM, plan: AttentionPlan, data: CalibrationData) -> dict:
        """Bottom-up: refit each chosen layer on states computed with the layers below
        already replaced, then swap its attention for the fitted map."""
        opts = self.options
        layers = decoder_layers(model)
        hidden = model.backbone.config.text_config.hidden_size
        reports = []
        mixed = opts.compensation == "linear_mean"
        for index in plan.layers:
            io = collect_layer_io(model, data, index, context=mixed)
            fit = fit_compensation(io.inputs, io.outputs, ridge=opts.ridge,
                                   rank=opts.compensation_rank, bias=opts.fit_bias,
                                   context=io.context)
            record = {"layer": index, "similarity": plan.similarity[index],
                      "errors": reconstruction_errors(io.inputs, io.outputs, fit, io.context)}
            if data.holdout is not None and len(data.holdout):
                held = collect_layer_io(model, data, index, data.holdout, context=mixed)
                record["holdout_errors"] = reconstruction_errors(held.inputs, held.outputs, fit,
                                                                held.context)
            parameter = next(layers[index].parameters())
            module = LinearCompensation(hidden, fit.rank, bias=opts.fit_bias,
                                        dtype=parameter.dtype, device=parameter.device,
                                        context=mixed)
            module.load_fit(fit)
            removed = _attention_params(layers[index])
            replace_attention(layers[index], module)
            record["params_removed"] = removed
            record["params_added"] = sum(p.numel() for p in module.parameters())
            reports.append(record)
        return {"layers": reports, "similarity": plan.similarity,
                "pruned_layers": list(plan.layers), "mode": plan.mode,
                "threshold": opts.threshold if plan.mode == "threshold" else None,
                "compensation_rank": opts.compensation_rank, "ridge": opts.ridge,
                "compensation": opts.compensation}

"""Structured pruning of the LLM: whole KV groups of attention heads and MLP neurons.

Units (per decoder layer):

- **KV group** ``g`` (GQA: one key/value head with the ``num_key_value_groups`` query
  heads that read it): rows ``g`` of ``q_proj`` (its query heads), ``k_proj`` and
  ``v_proj`` (its head), and the matching input columns of ``o_proj``.
- **Neuron** ``j``: row ``j`` of ``gate_proj`` and ``up_proj``, column ``j`` of
  ``down_proj``.

Importance (higher = keep), summed over the unit's weights (and biases):

- ``knowledge`` (002): gradients of ``L_knowledge`` (scores over all entities against all
  training-known answers) on KG samples, in mini-batches of ``grad_batch_size`` queries:
  ``squared`` = mean over mini-batches of ``(dL/dw)^2`` (empirical Fisher; per sample with
  ``grad_batch_size=1``), ``taylor`` = mean over mini-batches of ``|w * dL/dw|``.
- ``magnitude``: L2 norm of the unit's weights. ``random``: seeded uniform scores.

Ranking: ``global`` divides every score by the mean score of its unit type (KV groups or
neurons) over the whole LLM, so that each type is measured against its own typical value,
then ranks all units of all layers together; ``per_layer`` does the same within each
layer and gives each layer the same share of its own parameters to remove. Units are
removed from the least important up while the removed parameters stay closest to the
target (``amount`` x the original prunable parameters, minus what earlier rounds already
removed), never going below ``min_heads_per_layer`` KV groups / ``min_neurons_per_layer``
neurons in a layer. Prunable parameters are the q/k/v/o and gate/up/down weights (and
biases) of every decoder layer of the unpruned LLM.

Removal is physical: the ``nn.Linear`` modules are replaced by smaller ones, so the
pruned model runs faster and uses less memory. LoRA adapters must be merged first
(:func:`elmm_ray.models.lora.merge_lora`); new adapters can be applied afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from elmm_ray.losses.knowledge import knowledge_loss
from elmm_ray.models.elmm import ELMM
from elmm_ray.models.surgery import (
    attention_shape,
    base_linear,
    decoder_layers,
    is_compensated,
    remove_kv_groups,
    remove_neurons,
)
from elmm_ray.pruning.base import CalibrationData, Pruner, model_device

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


# --- shapes and parameter counts -----------------------------------------------------------


def layer_shapes(model: ELMM) -> list[dict]:
    """Per decoder layer: query/kv heads (0 when the attention is compensated), neurons."""
    shapes = []
    for layer in decoder_layers(model):
        neurons = base_linear(layer.mlp.gate_proj).out_features
        if is_compensated(layer):
            shapes.append({"heads": 0, "kv_heads": 0, "neurons": neurons, "compensated": True})
        else:
            heads, kv_heads, _, _ = attention_shape(layer.self_attn)
            shapes.append({"heads": heads, "kv_heads": kv_heads, "neurons": neurons,
                           "compensated": False})
    return shapes


def _linear_params(module: nn.Module) -> int:
    linear = base_linear(module)
    return linear.weight.numel() + (linear.bias.numel() if linear.bias is not None else 0)


def layer_prunable_parameters(layer: nn.Module) -> int:
    """Current q/k/v/o + gate/up/down parameters of one decoder layer."""
    total = sum(_linear_params(getattr(layer.mlp, n)) for n in MLP_PROJECTIONS)
    if not is_compensated(layer):
        total += sum(_linear_params(getattr(layer.self_attn, n)) for n in ATTENTION_PROJECTIONS)
    return total


def prunable_parameters(model: ELMM) -> int:
    """Current prunable parameters of the LLM (compensation maps are not counted)."""
    return sum(layer_prunable_parameters(layer) for layer in decoder_layers(model))


def original_layer_parameters(text_config) -> int:
    """Prunable parameters of one decoder layer of the unpruned LLM described by the config."""
    d = text_config.hidden_size
    heads = text_config.num_attention_heads
    kv_heads = text_config.num_key_value_heads
    head_dim = getattr(text_config, "head_dim", None) or d // heads
    attn = d * head_dim * (2 * heads + 2 * kv_heads)
    if getattr(text_config, "attention_bias", False):
        attn += head_dim * (heads + 2 * kv_heads) + d
    inter = text_config.intermediate_size
    mlp = 3 * d * inter
    if getattr(text_config, "mlp_bias", False):
        mlp += 2 * inter + d
    return attn + mlp


def original_prunable_parameters(model: ELMM) -> int:
    cfg = model.backbone.config.text_config
    return original_layer_parameters(cfg) * cfg.num_hidden_layers


# --- importance --------------------------------------------------------------------------------


@dataclass
class UnitScores:
    """One score per KV group (``heads[layer]``) and per neuron (``neurons[layer]``)."""

    heads: dict[int, Tensor] = field(default_factory=dict)
    neurons: dict[int, Tensor] = field(default_factory=dict)

    def map(self, fn: Callable[[Tensor], Tensor]) -> UnitScores:
        return UnitScores({k: fn(v) for k, v in self.heads.items()},
                          {k: fn(v) for k, v in self.neurons.items()})


def prunable_tensors(model: ELMM) -> list[nn.Parameter]:
    """Weights and biases of every projection that structured pruning can shrink."""
    tensors = []
    for layer in decoder_layers(model):
        modules = [getattr(layer.mlp, n) for n in MLP_PROJECTIONS]
        if not is_compensated(layer):
            modules += [getattr(layer.self_attn, n) for n in ATTENTION_PROJECTIONS]
        for module in modules:
            linear = base_linear(module)
            tensors += [p for p in (linear.weight, linear.bias) if p is not None]
    return tensors


def unit_sums(model: ELMM, value: Callable[[nn.Parameter], Tensor]) -> UnitScores:
    """Sum ``value(p)`` (a tensor shaped like ``p``) over the weights of every unit."""
    scores = UnitScores()
    for index, layer in enumerate(decoder_layers(model)):
        mlp = layer.mlp
        gate, up, down = (base_linear(getattr(mlp, n)) for n in MLP_PROJECTIONS)
        neurons = value(gate.weight).sum(1) + value(up.weight).sum(1) + value(down.weight).sum(0)
        for bias in (gate.bias, up.bias):
            if bias is not None:
                neurons = neurons + value(bias)
        scores.neurons[index] = neurons.detach().float().cpu()
        if is_compensated(layer):
            continue
        attn = layer.self_attn
        _, kv_heads, head_dim, rep = attention_shape(attn)
        q, k, v, o = (base_linear(getattr(attn, n)) for n in ATTENTION_PROJECTIONS)
        heads = (value(q.weight).reshape(kv_heads, -1).sum(1)
                 + value(k.weight).reshape(kv_heads, -1).sum(1)
                 + value(v.weight).reshape(kv_heads, -1).sum(1)
                 + value(o.weight).reshape(o.out_features, kv_heads, rep * head_dim).sum((0, 2)))
        for bias in (q.bias, k.bias, v.bias):
            if bias is not None:
                heads = heads + value(bias).reshape(kv_heads, -1).sum(1)
        scores.heads[index] = heads.detach().float().cpu()
    return scores


def unit_costs(model: ELMM) -> UnitScores:
    """Parameters of every unit (what removing it saves)."""
    return unit_sums(model, torch.ones_like)


def knowledge_importance(model: ELMM, data: CalibrationData, *, form: str = "squared",
                         batch_size: int = 4) -> UnitScores:
    """Gradient importance of every unit under ``L_knowledge`` (see the module docstring)."""
    if form not in ("squared", "taylor"):
        raise ValueError(f"importance form must be 'squared' or 'taylor', got {form!r}")
    params = prunable_tensors(model)
    flags = [p.requires_grad for p in params]
    totals = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    batches = 0
    try:
        for p in params:
            p.requires_grad_(True)
        for batch, chunk in data.batches(batch_size=batch_size, device=model_device(model)):
            rows, cols = data.known.mask_pairs(chunk[:, 0], chunk[:, 1])
            if len(rows) == 0:
                continue
            with torch.enable_grad():
                loss = knowledge_loss(model.score(model.encode_queries(batch)), rows, cols)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            for total, p, g in zip(totals, params, grads):
                if g is None:
                    continue
                g = g.float()
                total += g.square() if form == "squared" else (p.detach().float() * g).abs()
            batches += 1
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    if not batches:
        raise ValueError("no calibration query has a known answer: cannot compute L_knowledge")
    per_weight = {id(p): t / batches for p, t in zip(params, totals)}
    return unit_sums(model, lambda p: per_weight[id(p)])


def magnitude_importance(model: ELMM) -> UnitScores:
    """L2 norm of each unit's weights (and biases)."""
    return unit_sums(model, lambda p: p.detach().float().square()).map(torch.sqrt)


def random_importance(model: ELMM, seed: int) -> UnitScores:
    """Seeded uniform scores (the random baseline)."""
    generator = torch.Generator().manual_seed(seed)
    costs = unit_costs(model)
    heads = {k: torch.rand(len(v), generator=generator) for k, v in sorted(costs.heads.items())}
    neurons = {k: torch.rand(len(v), generator=generator)
               for k, v in sorted(costs.neurons.items())}
    return UnitScores(heads, neurons)


# --- planning ------------------------------------------------------------------------------------


@dataclass
class StructuredPlan:
    """KV groups and neurons to remove per layer (indices into the current shapes)."""

    heads: dict[int, list[int]]
    neurons: dict[int, list[int]]
    removed_params: int
    target_params: int
    original_params: int
    params_before: int

    def summary(self) -> dict:
        return {
            "kv_groups_removed": {str(k): len(v) for k, v in sorted(self.heads.items()) if v},
            "neurons_removed": {str(k): len(v) for k, v in sorted(self.neurons.items()) if v},
            "params_removed_this_round": self.removed_params,
            "target_params_removed_total": self.target_params,
            "original_prunable_params": self.original_params,
        }


def _normalised(values: list[Tensor]) -> list[Tensor]:
    if not values:
        return values
    mean = float(torch.cat(values).mean()) if sum(v.numel() for v in values) else 0.0
    scale = mean if mean > 0 else 1.0
    return [v / scale for v in values]


def _select(units: list[tuple[float, int, int, int, int]], need: int, kept: dict,
            minimum: dict) -> tuple[list[tuple[int, int, int]], int]:
    """Greedy from the lowest score; skip a unit whose removal would overshoot ``need``
    by more than it is short of it, or take a layer below its minimum."""
    chosen, removed = [], 0
    for _, kind, layer, index, cost in sorted(units):
        if removed >= need:
            break
        if kept[(kind, layer)] <= minimum[kind]:
            continue
        if removed + cost - need > need - removed:
            continue
        kept[(kind, layer)] -= 1
        chosen.append((kind, layer, index))
        removed += cost
    return chosen, removed


def plan_removal(model: ELMM, scores: UnitScores, amount: float, *, scope: str = "global",
                 min_heads_per_layer: int = 1, min_neurons_per_layer: int = 1
                 ) -> StructuredPlan:
    """Units to remove so that ``amount`` of the original prunable parameters are gone."""
    if not 0 <= amount < 1:
        raise ValueError(f"amount must be in [0, 1), got {amount}")
    costs = unit_costs(model)
    original = original_prunable_parameters(model)
    current = prunable_parameters(model)
    target = int(round(amount * original))
    kept = {(0, k): len(v) for k, v in costs.heads.items()}
    kept |= {(1, k): len(v) for k, v in costs.neurons.items()}
    minimum = {0: min_heads_per_layer, 1: min_neurons_per_layer}

    def units_of(layers: Sequence[int]) -> list[tuple[float, int, int, int, int]]:
        out = []
        for kind, table, cost_table in ((0, scores.heads, costs.heads),
                                        (1, scores.neurons, costs.neurons)):
            present = [k for k in layers if k in cost_table]
            normed = _normalised([table[k].float() for k in present])
            for k, values in zip(present, normed):
                if values.shape != cost_table[k].shape:
                    raise ValueError(f"scores of layer {k} do not match its current shape")
                out += [(float(s), kind, k, i, int(c))
                        for i, (s, c) in enumerate(zip(values.tolist(), cost_table[k].tolist()))]
        return out

    chosen: list[tuple[int, int, int]] = []
    removed = 0
    layers = list(range(len(decoder_layers(model))))
    if scope == "global":
        chosen, removed = _select(units_of(layers), max(0, current - (original - target)),
                                  kept, minimum)
    elif scope == "per_layer":
        per_layer_original = original // max(1, len(layers))
        for k in layers:
            now = layer_prunable_parameters(decoder_layers(model)[k])
            need = max(0, now - (per_layer_original - int(round(amount * per_layer_original))))
            picked, count = _select(units_of([k]), need, kept, minimum)
            chosen += picked
            removed += count
    else:
        raise ValueError(f"scope must be 'global' or 'per_layer', got {scope!r}")
    heads: dict[int, list[int]] = {}
    neurons: dict[int, list[int]] = {}
    for kind, layer, index in chosen:
        (heads if kind == 0 else neurons).setdefault(layer, []).append(index)
    return StructuredPlan({k: sorted(v) for k, v in heads.items()},
                          {k: sorted(v) for k, v in neurons.items()},
                          removed, target, original, current)


# --- physical removal --------------------------------------------------------------------------


def remove_units(model: ELMM, heads: dict[int, list[int]], neurons: dict[int, list[int]]
                 ) -> None:
    """Physically remove the given KV groups and neurons (indices per layer)."""
    layers = decoder_layers(model)
    for index, groups in heads.items():
        if groups:
            if is_compensated(layers[index]):
                raise ValueError(f"layer {index} has no attention heads left (compensated)")
            remove_kv_groups(layers[index].self_attn, groups)
    for index, units in neurons.items():
        if units:
            remove_neurons(layers[index].mlp, units)


# --- pruners -----------------------------------------------------------------------------------


class StructuredPruner(Pruner):
    """Shared plan/apply of the structured pruners; subclasses only define :meth:`score`."""

    def plan(self, model: ELMM, scores: UnitScores, amount: float) -> StructuredPlan:
        opts = self.options
        return plan_removal(model, scores, amount, scope=opts.scope,
                            min_heads_per_layer=opts.min_heads_per_layer,
                            min_neurons_per_layer=opts.min_neurons_per_layer)

    def apply(self, model: ELMM, plan: StructuredPlan, data: CalibrationData) -> dict:
        remove_units(model, plan.heads, plan.neurons)
        after = prunable_parameters(model)
        return {**plan.summary(), "prunable_params": after,
                "removed_share": 1.0 - after / plan.original_params,
                "layers": layer_shapes(model)}


class KnowledgePruner(StructuredPruner):
    """Knowledge-guided (002): gradients of L_knowledge on KG samples."""

    name = "knowledge"

    def score(self, model: ELMM, data: CalibrationData) -> UnitScores:
        return knowledge_importance(model, data, form=self.options.importance,
                                    batch_size=self.options.grad_batch_size)


class MagnitudePruner(StructuredPruner):
    """Baseline: L2 norm of each unit's weights."""

    name = "magnitude"

    def score(self, model: ELMM, data: CalibrationData) -> UnitScores:
        return magnitude_importance(model)


class RandomPruner(StructuredPruner):
    """Baseline: random units (seeded by ``options.seed``)."""

    name = "random"

    def score(self, model: ELMM, data: CalibrationData) -> UnitScores:
        return random_importance(model, self.options.seed)

"""Model surgery: the modules and in-place edits that change a Llama decoder's shape.

Pruning (:mod:`elmm_ray.pruning`) decides *what* to remove and reports; this module does
the removal (KV groups of attention heads, MLP neurons, whole attention sublayers replaced
by a :class:`LinearCompensation`), and :mod:`elmm_ray.models.pruned` saves and reloads the
result. Pure PyTorch.

Linear compensation of a removed attention sublayer (ELMM): a decoder layer computes
``h_mid = h + attn(norm(h))``. When its attention is pruned the layer computes
``h_mid ~= h @ W + b`` instead, with ``W = I + D`` fitted by ridge least squares on
calibration states. :class:`LinearCompensation` stands in for ``self_attn`` and returns
``h @ D + b`` (the decoder adds the residual ``h`` itself); the layer's
``input_layernorm`` becomes an identity so that the module sees the un-normed ``h``.
Parametrising the deviation ``D`` from the identity keeps the residual stream exact, makes
the ridge shrink ``W`` towards plain removal (``W = I``), and lets a rank-``r`` variant
store ``D = down @ up`` (``2 d r`` numbers instead of ``d^2``).

Token mixing (``context=True``): an attention output depends on the *other* tokens, which
no map of the token's own state can express. The context variant adds a linear map of the
causal running mean of the states up to and including the token,
``h_mid ~= h @ W + mean_{s<=t}(h_s) @ C + b`` (``O(d^2)`` per token, no attention). The
running mean is taken over the positions of the call, so it relies on right padding (what
:meth:`ELMM.build_prompt` produces): a real token's mean covers only real tokens. It does
not support incremental decoding with a KV cache (ELMM only encodes whole prompts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

if TYPE_CHECKING:
    from elmm_ray.models.elmm import ELMM


def causal_mean(states: Tensor) -> Tensor:
    """Running mean over the sequence axis (``-2``): row ``t`` is the mean of rows ``0..t``
    (accumulated in float32, returned in the input's dtype)."""
    acc = states.to(torch.float32).cumsum(dim=-2)
    count = torch.arange(1, states.shape[-2] + 1, device=states.device, dtype=torch.float32)
    return (acc / count.unsqueeze(-1)).to(states.dtype)


@dataclass
class CompensationFit:
    """A fitted ``W = I + D`` (``D = down @ up`` when ``rank > 0``) and bias, float32; with
    token mixing also ``C`` (``context``; ``context_down @ up`` when ``rank > 0``), the map of
    the causal running mean of the states."""

    delta: Tensor
    bias: Tensor | None
    rank: int = 0
    down: Tensor | None = None
    up: Tensor | None = None
    context: Tensor | None = None
    context_down: Tensor | None = None

    @property
    def weight(self) -> Tensor:
        return torch.eye(self.delta.shape[0], dtype=self.delta.dtype) + self.delta

    @property
    def uses_context(self) -> bool:
        return self.context is not None

    def predict(self, inputs: Tensor, context: Tensor | None = None) -> Tensor:
        """``inputs @ W + b`` (``+ context @ C`` for a token-mixing fit: ``context`` holds the
        causal running means of the states, row for row)."""
        x = inputs.to(self.delta.dtype)
        out = x + x @ self.delta
        if self.context is not None:
            if context is None or context.shape != inputs.shape:
                raise ValueError("this compensation mixes tokens: pass the causal running "
                                 "means of the states (context) with the same shape as inputs")
            out = out + context.to(self.delta.dtype) @ self.context
        return out + self.bias if self.bias is not None else out


class LinearCompensation(nn.Module):
    """Replacement of a decoder layer's ``self_attn``: ``h -> (h @ D + b, None)``, with
    ``context=True`` ``h -> (h @ D + causal_mean(h) @ C + b, None)``.

    ``rank = 0``: ``D`` (``delta``) and ``C`` (``context``) are full ``d x d`` parameters;
    ``rank = r``: ``D = down @ up`` and ``C = context_down @ up`` (``d x r`` and ``r x d``,
    one shared ``up``). ``weight`` gives the full ``W = I + D``.
    """

    def __init__(self, hidden_size: int, rank: int = 0, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 context: bool = False) -> None:
        super().__init__()
        if rank < 0 or rank > hidden_size:
            raise ValueError(f"compensation rank must be in [0, {hidden_size}], got {rank}")
        self.hidden_size, self.rank, self.uses_context = hidden_size, rank, bool(context)
        kw = {"dtype": dtype, "device": device}
        if rank:
            self.down = nn.Parameter(torch.zeros(hidden_size, rank, **kw))
            self.up = nn.Parameter(torch.zeros(rank, hidden_size, **kw))
            if context:
                self.context_down = nn.Parameter(torch.zeros(hidden_size, rank, **kw))
        else:
            self.delta = nn.Parameter(torch.zeros(hidden_size, hidden_size, **kw))
            if context:
                self.context = nn.Parameter(torch.zeros(hidden_size, hidden_size, **kw))
        self.bias = nn.Parameter(torch.zeros(hidden_size, **kw)) if bias else None

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    def delta_matrix(self) -> Tensor:
        """``D = W - I``."""
        return self.down @ self.up if self.rank else self.delta

    def context_matrix(self) -> Tensor | None:
        """``C``, the map of the causal running mean (``None`` without token mixing)."""
        if not self.uses_context:
            return None
        return self.context_down @ self.up if self.rank else self.context

    @property
    def weight(self) -> Tensor:
        """The full map ``W = I + D`` of ``h_mid = h @ W + b``."""
        delta = self.delta_matrix()
        return torch.eye(self.hidden_size, dtype=delta.dtype, device=delta.device) + delta

    def forward(self, hidden_states: Tensor, *args: object, **kwargs: object
                ) -> tuple[Tensor, None]:
        """Same call and return shape as ``LlamaAttention`` (extra arguments are ignored;
        ``hidden_states`` is ``(B, L, d)``, the running mean runs over ``L``)."""
        mean = causal_mean(hidden_states) if self.uses_context else None
        if self.rank:
            low = hidden_states @ self.down
            if mean is not None:
                low = low + mean @ self.context_down
            out = low @ self.up
        else:
            out = hidden_states @ self.delta
            if mean is not None:
                out = out + mean @ self.context
        if self.bias is not None:
            out = out + self.bias
        return out, None

    @torch.no_grad()
    def load_fit(self, fit: CompensationFit) -> None:
        """Copy a :func:`fit_compensation` result into the parameters."""
        if (fit.rank != self.rank or (fit.bias is not None) != self.has_bias
                or fit.uses_context != self.uses_context):
            raise ValueError(f"the fit (rank {fit.rank}, bias {fit.bias is not None}, "
                             f"context {fit.uses_context}) does not match this module "
                             f"({self.extra_repr()})")
        if self.rank:
            self.down.copy_(fit.down.to(self.down.dtype))
            self.up.copy_(fit.up.to(self.up.dtype))
            if self.uses_context:
                self.context_down.copy_(fit.context_down.to(self.context_down.dtype))
        else:
            self.delta.copy_(fit.delta.to(self.delta.dtype))
            if self.uses_context:
                self.context.copy_(fit.context.to(self.context.dtype))
        if self.bias is not None:
            self.bias.copy_(fit.bias.to(self.bias.dtype))

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, rank={self.rank}, bias={self.has_bias}, "
                f"context={self.uses_context}")


def decoder_layers(model: ELMM) -> nn.ModuleList:
    """The Llama decoder layers of the ELMM's LLM."""
    return model.language_model.layers


def is_compensated(layer: nn.Module) -> bool:
    """Whether the layer's attention sublayer was replaced by a :class:`LinearCompensation`."""
    return isinstance(layer.self_attn, LinearCompensation)


def replace_attention(layer: nn.Module, module: LinearCompensation) -> None:
    """Swap ``layer.self_attn`` for ``module`` and drop the now unused input norm."""
    layer.input_layernorm = nn.Identity()
    layer.self_attn = module


def base_linear(module: nn.Module) -> nn.Linear:
    """The plain ``nn.Linear`` under a (possibly LoRA-wrapped) projection."""
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _plain(module: nn.Module, what: str) -> nn.Linear:
    if isinstance(module, BaseTunerLayer):
        raise ValueError(f"{what} carries a LoRA adapter: merge LoRA (merge_lora) before "
                         "structured pruning and apply new adapters afterwards")
    return module


def attention_shape(attn: nn.Module) -> tuple[int, int, int, int]:
    """``(query heads, kv heads, head_dim, query heads per kv head)`` of a Llama attention."""
    head_dim = int(attn.head_dim)
    heads = base_linear(attn.q_proj).out_features // head_dim
    kv_heads = base_linear(attn.k_proj).out_features // head_dim
    return heads, kv_heads, head_dim, int(attn.num_key_value_groups)


def _slice_linear(module: nn.Module, keep: Tensor, dim: int, what: str) -> nn.Linear:
    linear = _plain(module, what)
    weight = linear.weight.detach().index_select(dim, keep.to(linear.weight.device))
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            bias = linear.bias.detach()
            new.bias.copy_(bias.index_select(0, keep.to(bias.device)) if dim == 0 else bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(linear.bias.requires_grad)
    return new


def _keep(total: int, remove: Sequence[int], what: str) -> list[int]:
    drop = set(int(i) for i in remove)
    if any(i < 0 or i >= total for i in drop):
        raise IndexError(f"{what}: indices {sorted(drop)} out of range for {total}")
    return [i for i in range(total) if i not in drop]


def _spans(keep: Sequence[int], width: int) -> Tensor:
    return torch.cat([torch.arange(i * width, (i + 1) * width) for i in keep])


def remove_kv_groups(attn: nn.Module, groups: Sequence[int]) -> None:
    """Remove KV groups (a KV head and its query heads) from a Llama attention in place."""
    heads, kv_heads, head_dim, rep = attention_shape(attn)
    keep = _keep(kv_heads, groups, "kv groups")
    if not keep:
        raise ValueError("cannot remove every KV group of a layer (prune the layer instead)")
    if len(keep) == kv_heads:
        return
    q_rows, kv_rows = _spans(keep, rep * head_dim), _spans(keep, head_dim)
    attn.q_proj = _slice_linear(attn.q_proj, q_rows, 0, "q_proj")
    attn.k_proj = _slice_linear(attn.k_proj, kv_rows, 0, "k_proj")
    attn.v_proj = _slice_linear(attn.v_proj, kv_rows, 0, "v_proj")
    attn.o_proj = _slice_linear(attn.o_proj, q_rows, 1, "o_proj")
    # LlamaAttention's forward reads head_dim and num_key_value_groups (both unchanged)
    # and infers the head count from the projection's width; these are for the record.
    attn.num_heads = len(keep) * rep
    attn.num_key_value_heads = len(keep)


def remove_neurons(mlp: nn.Module, neurons: Sequence[int]) -> None:
    """Remove intermediate neurons from a Llama MLP in place."""
    total = base_linear(mlp.gate_proj).out_features
    keep = _keep(total, neurons, "neurons")
    if not keep:
        raise ValueError("cannot remove every neuron of an MLP")
    if len(keep) == total:
        return
    rows = torch.tensor(keep)
    mlp.gate_proj = _slice_linear(mlp.gate_proj, rows, 0, "gate_proj")
    mlp.up_proj = _slice_linear(mlp.up_proj, rows, 0, "up_proj")
    mlp.down_proj = _slice_linear(mlp.down_proj, rows, 1, "down_proj")
    mlp.intermediate_size = len(keep)

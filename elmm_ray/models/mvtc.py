"""MVTC: the Multi-view Visual Token Compressor of ELMM.

All patch tokens of an entity's images (0..10 images x hundreds of tokens) become
``n_visual + n_text`` tokens. The visual view's learnable queries attend over the patch
tokens directly; the textual view's queries first attend over the entity + relation text
embeddings, then over the patch tokens.

The output stays in vision-feature space so that Llava's own pretrained
``multi_modal_projector`` maps it into the LLM: each token is a multi-head attention
pooling of the raw patch features (head ``h`` pools channel slice ``h``), followed by a
residual MLP whose last layer starts at zero. At initialisation every output token is
therefore a convex combination of real patch features, which the projector already knows.

The pooling attentions never project the patch tokens: a query's logit over a key
``W_k LayerNorm(x) + b`` equals ``(W_k^T q) * gamma . standardise(x) + const``, so the
queries are mapped into the feature space instead (a few queries against hundreds to
thousands of patch tokens per entity), the standardised patch tokens carry no gradient and
are computed once for both views (:func:`folded_pooling`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def masked_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Scaled dot-product attention over a padded context.

    ``query (B, H, Q, d)``, ``key (B, H, P, d)``, ``value (B, H, P, e)``, ``mask (B, P)``
    (True = real). Rows whose context is empty get zeros instead of NaN.
    """
    batch, heads, queries, _ = query.shape
    if key.shape[2] == 0:
        return query.new_zeros(batch, heads, queries, value.shape[-1])
    has_context = mask.any(dim=1)
    safe_mask = mask.clone()
    safe_mask[:, 0] |= ~has_context
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=safe_mask[:, None, None, :])
    return out.masked_fill(~has_context[:, None, None, None], 0.0)


@dataclass
class PoolingContext:
    """What the pooling attentions need of a context ``(B, P, C)``, computed once for all
    of them (with a gradient only if the context has one; frozen features have none):
    ``keys (B, P, C + 1)``: the context standardised (``LayerNorm`` without its affine
    part) with a column of ones; ``values (B, H, P, C / H)``: the context split channel-wise
    over the heads; ``bias (B, 1, P)``: 0 for a real token, -inf for padding (an empty
    context keeps its first token, its output is zeroed); ``has_context (B,)``."""

    keys: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor
    has_context: torch.Tensor
    eps: float

    @classmethod
    def of(cls, context: torch.Tensor, mask: torch.Tensor, heads: int,
           eps: float) -> PoolingContext:
        batch, length, channels = context.shape
        keys = context.new_ones(batch, length, channels + 1)
        keys[..., :channels] = F.layer_norm(context, (channels,), eps=eps)
        values = context.view(batch, length, heads, channels // heads)
        values = values.transpose(1, 2).contiguous()
        has_context = mask.any(dim=1)
        safe_mask = mask.clone()
        if length:
            safe_mask[:, 0] |= ~has_context
        bias = torch.zeros(batch, 1, length, dtype=context.dtype, device=context.device)
        bias.masked_fill_(~safe_mask[:, None, :], float("-inf"))
        return cls(keys, values, bias, has_context, eps)


def folded_pooling(query: torch.Tensor, key_proj: nn.Linear, norm: nn.LayerNorm,
                   context: PoolingContext) -> torch.Tensor:
    """Multi-head attention of ``query (B, H, Q, d)`` over keys ``key_proj(norm(x))`` split
    over the heads, with values ``x (B, P, C)`` split channel-wise over the heads (``context``
    holds what is needed of ``x``: :class:`PoolingContext`). Returns ``(B, H, Q, C / H)``.

    Equal to :func:`masked_attention` on the projected keys, without projecting the ``P``
    context tokens: with ``s`` the standardised token, head ``h``'s logit is
    ``q . (W_h (gamma * s + beta) + b_h) / sqrt(d)`` =
    ``[(W_h^T q) * gamma, q . (W_h beta + b_h)] . [s, 1] / sqrt(d)``, so the queries are
    mapped into the context's space (``H Q (C + 1)`` products per token instead of ``C d H``
    for the projection and ``H Q d`` for the logits) and frozen tokens need no gradient. The
    last term is the same for every token of a query (the softmax ignores it); it is kept so
    that the key bias and the norm's bias stay in the graph, as they were. Cheaper per token
    while ``heads x queries`` is below the MVTC width (``configs/fb15k237_llava7b.yaml``: 8 x 32
    = 256 against 1,024; the demo: 4 x 8 against 64); ``elmm-ray plan`` counts it this way."""
    if norm.eps != context.eps:
        raise ValueError(f"the pooling context was standardised with eps {context.eps}, "
                         f"this attention's norm uses {norm.eps}")
    batch, heads, queries, width = query.shape
    length = context.keys.shape[1]
    if length == 0:
        return query.new_zeros(batch, heads, queries, context.values.shape[-1])
    channels = context.keys.shape[2] - 1
    weight = key_proj.weight.view(heads, width, channels)
    in_context = torch.einsum("bhqd,hdc->bhqc", query, weight)  # W_h^T q
    shift = in_context @ norm.bias + torch.einsum("bhqd,hd->bhq", query,
                                                    key_proj.bias.view(heads, width))
    folded = torch.cat([in_context * norm.weight, shift[..., None]], dim=-1) * width ** -0.5
    logits = torch.baddbmm(context.bias, folded.reshape(batch, heads * queries, channels + 1),
                           context.keys.transpose(1, 2))
    # at least float32 inside the softmax (half-precision logits over thousands of tokens)
    weights = logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    weights = weights.to(context.values.dtype).view(batch, heads, queries, length)
    out = torch.matmul(weights, context.values)
    return out.masked_fill(~context.has_context[:, None, None, None], 0.0)


class CrossAttention(nn.Module):
    """Multi-head cross-attention from ``dim``-wide queries to a masked context.

    With ``raw_values`` the values are the context itself, split channel-wise over the
    heads, and there is no output projection: the result lives in the context's space.
    """

    def __init__(self, dim: int, context_dim: int, heads: int, *, raw_values: bool) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"MVTC width {dim} is not divisible by {heads} heads")
        if raw_values and context_dim % heads:
            raise ValueError(
                f"vision feature width {context_dim} is not divisible by {heads} heads"
            )
        self.heads = heads
        self.raw_values = raw_values
        self.query_norm = nn.LayerNorm(dim)
        self.context_norm = nn.LayerNorm(context_dim)
        self.query_proj = nn.Linear(dim, dim)
        self.key_proj = nn.Linear(context_dim, dim)
        if not raw_values:
            self.value_proj = nn.Linear(context_dim, dim)
            self.out_proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

    def forward(
        self, queries: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor,
        pooling: PoolingContext | None = None,
    ) -> torch.Tensor:
        """``queries (B, Q, dim)``, ``context (B, P, context_dim)`` -> ``(B, Q, out)``.

        With ``raw_values`` the context is never projected (:func:`folded_pooling`);
        ``pooling``: the context's :class:`PoolingContext` when the caller has it."""
        query = self._split(self.query_proj(self.query_norm(queries)))
        if self.raw_values:
            if pooling is None:
                pooling = PoolingContext.of(context, context_mask, self.heads,
                                            self.context_norm.eps)
            out = folded_pooling(query, self.key_proj, self.context_norm, pooling)
            return out.transpose(1, 2).flatten(2)
        normed = self.context_norm(context)
        key = self._split(self.key_proj(normed))
        value = self._split(self.value_proj(normed))
        out = masked_attention(query, key, value, context_mask)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """Pre-norm residual MLP; the last layer starts at zero (identity at init)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class PatchPooling(nn.Module):
    """Queries pool the patch tokens (raw-value attention) and refine them (residual MLP)."""

    def __init__(self, dim: int, feature_dim: int, heads: int) -> None:
        super().__init__()
        self.attention = CrossAttention(dim, feature_dim, heads, raw_values=True)
        self.mlp = FeedForward(feature_dim, dim)

    def forward(
        self, queries: torch.Tensor, patch_tokens: torch.Tensor, patch_mask: torch.Tensor,
        pooling: PoolingContext | None = None,
    ) -> torch.Tensor:
        return self.mlp(self.attention(queries, patch_tokens, patch_mask, pooling))


class TextConditioning(nn.Module):
    """Queries attend over the (projected) text embeddings: one pre-norm decoder block."""

    def __init__(self, dim: int, text_dim: int, heads: int) -> None:
        super().__init__()
        self.text_proj = nn.Linear(text_dim, dim)
        self.attention = CrossAttention(dim, dim, heads, raw_values=False)
        self.mlp = FeedForward(dim, dim)
        nn.init.normal_(self.mlp.down.weight, std=0.02)

    def forward(
        self, queries: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        text = self.text_proj(text_embeds)
        queries = queries + self.attention(queries, text, text_mask)
        return self.mlp(queries)


class MVTC(nn.Module):
    """Multi-view visual token compressor: patch tokens -> ``n_visual + n_text`` tokens."""

    def __init__(
        self,
        feature_dim: int,
        text_dim: int,
        n_visual: int = 32,
        n_text: int = 32,
        heads: int = 8,
        dim: int = 0,
    ) -> None:
        super().__init__()
        if n_visual < 0 or n_text < 0:
            raise ValueError("n_visual and n_text must be >= 0")
        dim = dim or feature_dim
        self.feature_dim = feature_dim
        self.text_dim = text_dim
        self.dim = dim
        self.n_visual = n_visual
        self.n_text = n_text
        if n_visual:
            self.visual_queries = nn.Parameter(torch.randn(n_visual, dim) * 0.02)
            self.visual_pool = PatchPooling(dim, feature_dim, heads)
        if n_text:
            self.text_queries = nn.Parameter(torch.randn(n_text, dim) * 0.02)
            self.text_conditioning = TextConditioning(dim, text_dim, heads)
            self.text_pool = PatchPooling(dim, feature_dim, heads)

    @property
    def num_tokens(self) -> int:
        """Output tokens per entity."""
        return self.n_visual + self.n_text

    def forward(
        self,
        patch_tokens: torch.Tensor,
        patch_mask: torch.Tensor,
        text_embeds: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compress ``patch_tokens (B, P, feature_dim)`` given ``text_embeds (B, L, text_dim)``.

        Returns ``tokens (B, n_visual + n_text, feature_dim)`` and ``token_mask`` (all
        False for an entity without any real patch token; its tokens are zeros).
        """
        batch = patch_tokens.shape[0]
        patch_mask = patch_mask.to(device=patch_tokens.device, dtype=torch.bool)
        token_mask = patch_mask.any(dim=1, keepdim=True).expand(batch, self.num_tokens)
        if self.num_tokens == 0:
            return patch_tokens.new_zeros(batch, 0, self.feature_dim), token_mask
        dtype = next(self.parameters()).dtype
        patch_tokens = patch_tokens.to(dtype)
        prepared: dict[tuple, PoolingContext] = {}  # both views' context, made once

        def pool(module: PatchPooling, queries: torch.Tensor) -> torch.Tensor:
            key = (module.attention.heads, module.attention.context_norm.eps)
            if key not in prepared:
                prepared[key] = PoolingContext.of(patch_tokens, patch_mask, *key)
            return module(queries, patch_tokens, patch_mask, prepared[key])

        views = []
        if self.n_visual:
            queries = self.visual_queries.unsqueeze(0).expand(batch, -1, -1)
            views.append(pool(self.visual_pool, queries))
        if self.n_text:
            text_mask = text_mask.to(device=patch_tokens.device, dtype=torch.bool)
            queries = self.text_queries.unsqueeze(0).expand(batch, -1, -1)
            queries = self.text_conditioning(queries, text_embeds.to(dtype), text_mask)
            views.append(pool(self.text_pool, queries))
        tokens = torch.cat(views, dim=1)
        tokens = tokens.masked_fill(~token_mask[:, :, None], 0.0)
        return tokens, token_mask

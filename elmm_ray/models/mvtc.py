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
"""

from __future__ import annotations

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
        self, queries: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor
    ) -> torch.Tensor:
        """``queries (B, Q, dim)``, ``context (B, P, context_dim)`` -> ``(B, Q, out)``."""
        normed = self.context_norm(context)
        query = self._split(self.query_proj(self.query_norm(queries)))
        key = self._split(self.key_proj(normed))
        value = self._split(context if self.raw_values else self.value_proj(normed))
        out = masked_attention(query, key, value, context_mask)
        out = out.transpose(1, 2).flatten(2)
        return out if self.raw_values else self.out_proj(out)


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
        self, queries: torch.Tensor, patch_tokens: torch.Tensor, patch_mask: torch.Tensor
    ) -> torch.Tensor:
        return self.mlp(self.attention(queries, patch_tokens, patch_mask))


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
        views = []
        if self.n_visual:
            queries = self.visual_queries.unsqueeze(0).expand(batch, -1, -1)
            views.append(self.visual_pool(queries, patch_tokens, patch_mask))
        if self.n_text:
            text_mask = text_mask.to(device=patch_tokens.device, dtype=torch.bool)
            queries = self.text_queries.unsqueeze(0).expand(batch, -1, -1)
            queries = self.text_conditioning(queries, text_embeds.to(dtype), text_mask)
            views.append(self.text_pool(queries, patch_tokens, patch_mask))
        tokens = torch.cat(views, dim=1)
        tokens = tokens.masked_fill(~token_mask[:, :, None], 0.0)
        return tokens, token_mask

"""ELMM: a Llava LLM that encodes KG queries into vectors scored against an entity table.

Prompt of a query (one row, right-padded, masked-out tokens packed away)::

    <s> head-entity text  [MVTC tokens of the head's images]  relation text  [<inv>]  <readout>

``<inv>`` marks a head-prediction query ``(t, r^-1, ?)``. The ``<readout>`` position's last
hidden state -> ``Linear`` -> L2 normalisation is the query vector; an entity is encoded the
same way without the relation. The vision tower never runs here: the batch carries
precomputed patch features (see :func:`elmm_ray.models.backbone.encode_images`).

Every trainable piece is a submodule called through its ``forward`` (entity table, learned
special tokens, readout), so parameter-gathering hooks such as ZeRO-3's see every use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaForConditionalGeneration

from elmm_ray.models.mvtc import MVTC

ENTITY_REPRS = ("table", "encoder", "table+encoder")


class EntityTable(nn.Module):
    """Entity vectors: a learnable row per entity, plus (optionally) an image pathway.

    With ``visual_dim`` > 0 each entity's vector is ``row + adapter(summary)`` where
    ``summary`` is the mean and max of the entity's patch features (set once with
    :meth:`set_visual_summary`; zeros for an entity without images). The adapter is shared
    by all entities, so it carries what training learns about pictures to entities whose
    rows never saw that fact (e.g. a held-out visual attribute of a head-prediction target).
    Its last layer starts at zero: at initialisation the vectors equal the rows.
    ``forward(ids)`` returns normalised vectors (all entities when ``ids`` is None); going
    through ``forward`` keeps the table usable under ZeRO-3 parameter partitioning.
    """

    def __init__(self, num_entities: int, embed_dim: int, temperature: float,
                 visual_dim: int = 0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.weight = nn.Parameter(F.normalize(torch.randn(num_entities, embed_dim), dim=-1))
        self.temperature = float(temperature)
        self.visual: nn.Sequential | None = None
        if visual_dim:
            self.visual = nn.Sequential(
                nn.LayerNorm(2 * visual_dim), nn.Linear(2 * visual_dim, embed_dim), nn.GELU(),
                nn.Linear(embed_dim, embed_dim),
            )
            nn.init.zeros_(self.visual[-1].weight)
            nn.init.zeros_(self.visual[-1].bias)
            self.register_buffer("visual_summary", torch.zeros(num_entities, 2 * visual_dim),
                                 persistent=False)

    @torch.no_grad()
    def set_visual_summary(self, features: torch.Tensor, image_mask: torch.Tensor,
                           start: int = 0) -> None:
        """Summaries of entities ``start ..`` from ``features (B, images, tokens, width)``."""
        if self.visual is None:
            return
        tokens = features.float().flatten(1, 2)
        mask = image_mask[:, :, None].expand(-1, -1, features.shape[2]).flatten(1)
        count = mask.sum(1, keepdim=True).clamp(min=1)
        mean = (tokens * mask[..., None]).sum(1) / count
        peak = tokens.masked_fill(~mask[..., None], float("-inf")).amax(1)
        peak = torch.where(mask.any(1, keepdim=True), peak, torch.zeros_like(peak))
        summary = torch.cat([mean, peak], dim=-1)
        self.visual_summary[start : start + len(summary)] = summary.to(self.visual_summary)

    def forward(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        rows = self.weight if ids is None else self.weight[ids]
        if self.visual is not None:
            summary = self.visual_summary if ids is None else self.visual_summary[ids]
            rows = rows + self.visual(summary.to(rows.dtype))
        return F.normalize(rows, dim=-1)


class LearnedTokens(nn.Module):
    """Trainable input embeddings for a few special tokens (``<readout>``, ``<inv>``).

    Under LoRA the vocabulary embedding is frozen; these rows replace it for their ids.
    """

    def __init__(self, token_ids: Sequence[int], initial: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer(
            "token_ids", torch.tensor(list(token_ids), dtype=torch.long), persistent=False
        )
        self.weight = nn.Parameter(initial.detach().clone())

    def forward(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """Replace the embeddings of the learned ids in ``embeds (B, L, H)``."""
        weight = self.weight.to(embeds.dtype)
        for index in range(self.token_ids.numel()):
            hit = (input_ids == self.token_ids[index]).unsqueeze(-1)
            embeds = torch.where(hit, weight[index], embeds)
        return embeds


class ELMM(nn.Module):
    """Query encoder (Llava LLM + MVTC + readout) and entity table of ELMM."""

    def __init__(
        self,
        backbone: LlavaForConditionalGeneration,
        mvtc: MVTC | None,
        *,
        num_entities: int,
        readout_token_id: int,
        embed_dim: int = 0,
        temperature: float = 0.05,
        learned_token_ids: Sequence[int] = (),
        uncompressed: bool = False,
        entity_image_adapter: bool = False,
        entity_repr: str = "table",
        feature_width: int = 0,
    ) -> None:
        super().__init__()
        if entity_repr not in ENTITY_REPRS:
            raise ValueError(f"entity_repr must be one of {ENTITY_REPRS}, got {entity_repr!r}")
        self.entity_repr = entity_repr
        if mvtc is None and not uncompressed:
            raise ValueError("an MVTC is needed unless uncompressed=True")
        self.backbone = backbone
        self.mvtc = None if uncompressed else mvtc
        self.uncompressed = uncompressed
        self.readout_token_id = int(readout_token_id)
        hidden = backbone.config.text_config.hidden_size
        self.embed_dim = embed_dim or hidden
        self.num_entities = num_entities
        dtype = self.input_embeddings.weight.dtype
        self.readout = nn.Linear(hidden, self.embed_dim).to(dtype)
        vision_width = backbone.config.vision_config.hidden_size
        # Features of another width (precomputed embeddings) enter through a trainable
        # linear map into the vision-feature space that MVTC and the projector expect.
        self.feature_width = int(feature_width or vision_width)
        visual_dim = self.feature_width if entity_image_adapter else 0
        self.entity_table = EntityTable(num_entities, self.embed_dim, temperature,
                                        visual_dim).to(dtype)
        # The latest encoding of every entity (encoder modes): refreshed by the trainer
        # and before every evaluation, never saved.
        self.register_buffer("entity_cache", torch.zeros(num_entities, self.embed_dim),
                             persistent=False)
        ids = sorted({int(i) for i in learned_token_ids} | {self.readout_token_id})
        with torch.no_grad():
            initial = self.input_embeddings.weight[torch.tensor(ids)]
        self.learned_tokens = LearnedTokens(ids, initial)
        if self.mvtc is not None:
            self.mvtc.to(dtype)
        self.visual_input: nn.Linear | None = None
        if self.feature_width != vision_width:
            self.visual_input = nn.Linear(self.feature_width, vision_width).to(dtype)

    @property
    def language_model(self) -> nn.Module:
        """The Llama base model (decoder layers + final norm, no LM head)."""
        return self.backbone.model.language_model

    @property
    def projector(self) -> nn.Module:
        """Llava's multimodal projector (vision-feature space -> LLM embedding space)."""
        return self.backbone.model.multi_modal_projector

    @property
    def input_embeddings(self) -> nn.Embedding:
        return self.backbone.get_input_embeddings()

    @property
    def temperature(self) -> float:
        return self.entity_table.temperature

    def always_trainable(self) -> dict[str, nn.Module]:
        """Modules that train in full whatever happens to the LLM (LoRA or not)."""
        modules = {
            "projector": self.projector,
            "readout": self.readout,
            "entity_table": self.entity_table,
            "learned_tokens": self.learned_tokens,
        }
        if self.entity_repr == "encoder":  # entity vectors are encodings alone
            del modules["entity_table"]
        if self.mvtc is not None:
            modules["mvtc"] = self.mvtc
        if self.visual_input is not None:
            modules["visual_input"] = self.visual_input
        return modules

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of token ids, with the learned special-token rows."""
        return self.learned_tokens(input_ids, self.input_embeddings(input_ids))

    def visual_tokens(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected visual prompt tokens ``(B, V, H)`` and their mask ``(B, V)``."""
        device = self.input_embeddings.weight.device
        dtype = self.projector.linear_1.weight.dtype
        features = batch["features"].to(device=device, dtype=dtype)
        if self.visual_input is not None:
            features = self.visual_input(features)
        image_mask = batch["image_mask"].to(device=device, dtype=torch.bool)
        size, images, tokens, width = features.shape
        patch_tokens = features.reshape(size, images * tokens, width)
        patch_mask = image_mask.unsqueeze(-1).expand(size, images, tokens).reshape(size, -1)
        if self.mvtc is None:
            return self.projector(patch_tokens), patch_mask
        context_ids = batch["context_ids"].to(device)
        context = self.embed_tokens(context_ids)
        compressed, mask = self.mvtc(patch_tokens, patch_mask, context, batch["context_mask"])
        return self.projector(compressed.to(dtype)), mask

    def build_prompt(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The LLM input: ``inputs_embeds (B, L, H)``, ``attention_mask (B, L)`` and the
        ``<readout>`` position per row. Masked tokens are packed out (right padding)."""
        device = self.input_embeddings.weight.device
        prefix_ids = batch["prefix_ids"].to(device)
        suffix_ids = batch["suffix_ids"].to(device)
        visual, visual_mask = self.visual_tokens(batch)
        embeds = torch.cat(
            [self.embed_tokens(prefix_ids), visual, self.embed_tokens(suffix_ids)], dim=1
        )
        mask = torch.cat(
            [batch["prefix_mask"].to(device), visual_mask, batch["suffix_mask"].to(device)], dim=1
        ).bool()
        is_readout = (
            torch.cat(
                [
                    prefix_ids == self.readout_token_id,
                    torch.zeros_like(visual_mask),
                    suffix_ids == self.readout_token_id,
                ],
                dim=1,
            )
            & mask
        )
        if not bool((is_readout.sum(dim=1) == 1).all()):
            raise ValueError("every prompt needs exactly one <readout> token")
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
        length = int(mask.sum(dim=1).max())
        order = order[:, :length]
        embeds = torch.gather(embeds, 1, order.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
        mask = torch.gather(mask, 1, order)
        readout_index = torch.gather(is_readout, 1, order).int().argmax(dim=1)
        return embeds, mask, readout_index

    def _encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        embeds, mask, readout_index = self.build_prompt(batch)
        hidden = self.language_model(
            inputs_embeds=embeds.to(self.input_embeddings.weight.dtype),
            attention_mask=mask.long(),
        ).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return F.normalize(self.readout(hidden[rows, readout_index]), dim=-1)

    def encode_queries(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised query vectors ``(B, embed_dim)`` of a :class:`QueryCollator` batch."""
        return self._encode(batch)

    def encode_entities(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised entity vectors ``(B, embed_dim)`` of an entity batch."""
        return self._encode(batch)

    @property
    def encodes_entities(self) -> bool:
        """Whether entity vectors come (partly) from the model's own entity encodings."""
        return self.entity_repr != "table"

    def entity_vectors(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised entity vectors ``(E or len(ids), embed_dim)``: table rows, the cached
        encodings (see :meth:`set_entity_cache`), or their normalised sum."""
        if self.entity_repr == "table":
            return self.entity_table(ids)
        cache = self.entity_cache if ids is None else self.entity_cache[ids]
        if self.entity_repr == "encoder":
            return cache
        return F.normalize(self.entity_table(ids) + cache.to(self.entity_table.weight.dtype),
                           dim=-1)

    def candidate_vectors(self, ids: torch.Tensor, entity_batch: dict[str, torch.Tensor]
                          ) -> torch.Tensor:
        """Vectors of the entities ``ids`` with gradients through their encodings
        (``entity_batch``: their :meth:`QueryCollator.entity_batch`), for the loss."""
        if self.entity_repr == "table":
            return self.entity_table(ids)
        encoded = self.encode_entities(entity_batch)
        if self.entity_repr == "encoder":
            return encoded
        return F.normalize(self.entity_table(ids) + encoded, dim=-1)

    @torch.no_grad()
    def set_entity_cache(self, vectors: torch.Tensor, start: int = 0) -> None:
        """Store fresh encodings of entities ``start .. start + len(vectors)``."""
        self.entity_cache[start : start + len(vectors)] = F.normalize(
            vectors.to(self.entity_cache), dim=-1)

    def score(self, query_vectors: torch.Tensor) -> torch.Tensor:
        """Scores ``(B, num_entities)``: cosine(query, entity) / temperature."""
        queries = F.normalize(query_vectors, dim=-1)
        entities = self.entity_vectors()
        return queries.to(entities.dtype) @ entities.T / self.temperature

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores of a query batch against every entity, ``(B, num_entities)``."""
        return self.score(self.encode_queries(batch))

    @torch.no_grad()
    def init_entity_table(self, vectors: torch.Tensor, start: int = 0) -> None:
        """Copy entity encodings into rows ``start .. start + len(vectors)`` of the table."""
        weight = self.entity_table.weight
        if vectors.ndim != 2 or vectors.shape[1] != weight.shape[1]:
            raise ValueError(
                f"entity vectors of shape {tuple(vectors.shape)} do not fit the table "
                f"{tuple(weight.shape)}"
            )
        if start < 0 or start + vectors.shape[0] > weight.shape[0]:
            raise ValueError(
                f"rows {start}..{start + vectors.shape[0]} are outside the table of "
                f"{weight.shape[0]} entities"
            )
        weight[start : start + vectors.shape[0]] = F.normalize(
            vectors.to(device=weight.device, dtype=torch.float32), dim=-1
        ).to(weight.dtype)

"""Turn batches of queries (or entities) into the inputs of :class:`elmm_ray.models.elmm.ELMM`.

A query is ``(entity, qrel)`` with ``qrel`` in ``[0, 2R)``: ``qrel < R`` asks for the tail of
``(entity, qrel, ?)``; ``qrel >= R`` asks for the head of ``(?, qrel - R, entity)``, written
``(entity, r^-1, ?)`` and marked with ``<inv>`` in the prompt. Texts are tokenised once at
construction; features are packed as given (a feature store or ``encode_images``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from elmm_ray.models.tokenizer import INVERSE_TOKEN, READOUT_TOKEN, token_id

Batch = dict[str, torch.Tensor]


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows: ``ids (B, L)`` long and ``mask (B, L)`` bool."""
    length = max((len(row) for row in rows), default=0)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return ids, mask


TOKENIZE_CHUNK = 1024  # texts tokenized at once


class QueryCollator:
    """Packs query (or entity) batches: token ids + masks of each prompt part and features.

    The batch keys: ``prefix_ids/prefix_mask`` (``<s>`` + entity text), ``suffix_ids/
    suffix_mask`` (relation text, ``<inv>`` for head prediction, ``<readout>``),
    ``context_ids/context_mask`` (the text that conditions MVTC's textual view: entity
    text + relation text, with ``<inv>`` for head prediction), ``features (B, max_images,
    tokens, width)``, ``image_mask (B, max_images)``, ``entities`` and ``qrels``.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        entity_texts: Sequence[str],
        relation_texts: Sequence[str],
        num_relations: int,
        max_text_tokens: int,
        max_relation_tokens: int | None = None,
    ) -> None:
        if len(relation_texts) != num_relations:
            raise ValueError(
                f"{len(relation_texts)} relation texts for num_relations={num_relations}"
            )
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; call prepare_tokenizer first")
        self.num_relations = num_relations
        self.pad_id = int(tokenizer.pad_token_id)
        self.bos = [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]
        self.readout_id = token_id(tokenizer, READOUT_TOKEN)
        self.inverse_id = token_id(tokenizer, INVERSE_TOKEN)
        relation_cap = max_relation_tokens or max_text_tokens
        self.entity_tokens = _tokenize(tokenizer, entity_texts, max_text_tokens)
        self.relation_tokens = _tokenize(tokenizer, relation_texts, relation_cap)

    @property
    def num_entities(self) -> int:
        return len(self.entity_tokens)

    def _check(self, entities: torch.Tensor, features: torch.Tensor, image_mask: torch.Tensor):
        if entities.ndim != 1:
            raise ValueError(f"entities must be 1-D, got shape {tuple(entities.shape)}")
        size = entities.shape[0]
        if features.ndim != 4 or features.shape[0] != size:
            raise ValueError(
                f"features must be (B={size}, max_images, tokens, width), "
                f"got {tuple(features.shape)}"
            )
        if tuple(image_mask.shape) != tuple(features.shape[:2]):
            raise ValueError(
                f"image_mask {tuple(image_mask.shape)} does not match features "
                f"{tuple(features.shape[:2])}"
            )
        if size and (int(entities.min()) < 0 or int(entities.max()) >= self.num_entities):
            raise ValueError(f"entity ids must lie in [0, {self.num_entities})")

    def _pack(
        self,
        prefixes: list[list[int]],
        suffixes: list[list[int]],
        contexts: list[list[int]],
        features: torch.Tensor,
        image_mask: torch.Tensor,
    ) -> Batch:
        batch: Batch = {}
        for name, rows in (("prefix", prefixes), ("suffix", suffixes), ("context", contexts)):
            batch[f"{name}_ids"], batch[f"{name}_mask"] = pad_rows(rows, self.pad_id)
        batch["features"] = features
        batch["image_mask"] = image_mask.bool()
        return batch

    def __call__(
        self,
        entities: torch.Tensor,
        qrels: torch.Tensor,
        features: torch.Tensor,
        image_mask: torch.Tensor,
    ) -> Batch:
        """A batch for ``ELMM.encode_queries``: query ``(entities[i], qrels[i], ?)``."""
        self._check(entities, features, image_mask)
        if qrels.shape != entities.shape:
            raise ValueError(f"qrels {tuple(qrels.shape)} must match entities")
        if qrels.numel() and (int(qrels.min()) < 0 or int(qrels.max()) >= 2 * self.num_relations):
            raise ValueError(f"query relations must lie in [0, {2 * self.num_relations})")
        prefixes, suffixes, contexts = [], [], []
        for entity, qrel in zip(entities.tolist(), qrels.tolist()):
            inverse = qrel >= self.num_relations
            relation = self.relation_tokens[qrel - self.num_relations if inverse else qrel]
            marker = [self.inverse_id] if inverse else []
            text = self.entity_tokens[entity]
            prefixes.append(self.bos + text)
            suffixes.append(relation + marker + [self.readout_id])
            contexts.append(text + relation + marker)
        batch = self._pack(prefixes, suffixes, contexts, features, image_mask)
        batch["entities"] = entities.long()
        batch["qrels"] = qrels.long()
        return batch

    def entity_batch(
        self, entities: torch.Tensor, features: torch.Tensor, image_mask: torch.Tensor
    ) -> Batch:
        """A batch for ``ELMM.encode_entities``: entity text + visual tokens + ``<readout>``."""
        self._check(entities, features, image_mask)
        prefixes, suffixes, contexts = [], [], []
        for entity in entities.tolist():
            text = self.entity_tokens[entity]
            prefixes.append(self.bos + text)
            suffixes.append([self.readout_id])
            contexts.append(text)
        batch = self._pack(prefixes, suffixes, contexts, features, image_mask)
        batch["entities"] = entities.long()
        return batch


def _tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_tokens: int
) -> list[list[int]]:
    """Token ids of each text, cut to ``max_tokens``; in chunks, so that the tokenizer's
    full encodings (offsets, token strings) of WN18's 40,943 entity texts at once (~200 MB
    of RSS) never exist together."""
    texts = list(texts)
    out: list[list[int]] = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        ids = tokenizer(texts[start:start + TOKENIZE_CHUNK], add_special_tokens=False)
        out.extend(list(row[:max_tokens]) for row in ids["input_ids"])
    return out

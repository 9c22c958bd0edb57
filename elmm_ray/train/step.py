"""The training step shared by the local trainer and the Ray Train loop.

``compute_loss`` takes a batch of training queries ``(entity, qrel, answer)`` and returns
``L = L_task + lambda * L_knowledge``; the caller does backward/step (plain torch or a
DeepSpeed engine). ``QueryBatches`` yields shuffled batches from a seeded position so that
a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from elmm_ray.data.collate import QueryCollator
from elmm_ray.data.image_features import FeatureBank
from elmm_ray.data.kg import FilterIndex
from elmm_ray.losses import (
    combined_loss,
    contrastive_loss,
    hard_negatives,
    knowledge_loss,
    sample_negatives,
)
from elmm_ray.models.elmm import ELMM


@dataclass
class LossParts:
    loss: torch.Tensor
    task: float
    knowledge: float


def compute_loss(
    model: ELMM,
    collator: QueryCollator,
    features: FeatureBank,
    queries: torch.Tensor,
    known: FilterIndex,
    *,
    num_negatives: int,
    knowledge_weight: float,
    num_hard_negatives: int = 0,
    in_batch_negatives: bool = True,
    generator: torch.Generator | None = None,
) -> LossParts:
    """Loss of one batch of training queries (``(B, 3)``: entity, qrel, answer).

    ``num_hard_negatives``: that many more negatives, the highest-scoring non-answers of the
    queries against the model's entity vectors (with an encoder: its cache, refreshed every
    ``train.entity_refresh_every`` steps), added to the ``num_negatives`` sampled ones."""
    entities, qrels, answers = queries[:, 0], queries[:, 1], queries[:, 2]
    feats, image_mask = features.features_for(entities)
    batch = collator(entities, qrels, feats, image_mask)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    query_vectors = model.encode_queries(batch)
    rows, cols = known.mask_pairs(entities.numpy(), qrels.numpy())
    negatives = None
    if num_negatives and model.encodes_entities:
        # Encoded candidates cost a forward each: K negatives shared by the whole batch.
        negatives = sample_negatives(1, num_negatives, model.num_entities,
                                     generator=generator).expand(len(entities), -1)
    elif num_negatives:
        negatives = sample_negatives(len(entities), num_negatives, model.num_entities,
                                     generator=generator)
    if num_hard_negatives:
        with torch.no_grad():
            hard = hard_negatives(model.score(query_vectors), answers, (rows, cols),
                                  num_hard_negatives, shared=model.encodes_entities).cpu()
        hard = hard.expand(len(entities), -1)
        negatives = hard if negatives is None else torch.cat([negatives, hard], dim=1)
    # Only the candidates' vectors are computed; ids are remapped to rows of that subset.
    blocks = [answers, entities] + ([negatives.flatten()] if negatives is not None else [])
    candidates = torch.cat(blocks).unique()
    local = torch.full((model.num_entities,), -1, dtype=torch.long)
    local[candidates] = torch.arange(len(candidates))
    local_cols = local[torch.as_tensor(cols, dtype=torch.long)]
    keep = local_cols >= 0
    known_local = (torch.as_tensor(rows)[keep], local_cols[keep])
    if model.encodes_entities:
        # Bi-encoder: gradients flow through the candidates' own encodings.
        cand_feats, cand_mask = features.features_for(candidates)
        entity_batch = collator.entity_batch(candidates, cand_feats, cand_mask)
        vectors = model.candidate_vectors(candidates.to(device),
                                          {k: v.to(device) for k, v in entity_batch.items()})
    else:
        vectors = model.entity_vectors(candidates.to(device))
    task = contrastive_loss(query_vectors, vectors, local[answers].to(device),
                            local[entities].to(device), temperature=model.temperature,
                            negatives=None if negatives is None else local[negatives].to(device),
                            known_answers=known_local, use_in_batch=in_batch_negatives)
    know = torch.zeros((), device=device)
    if knowledge_weight > 0:
        know = knowledge_loss(model.score(query_vectors), rows, cols)
    loss = combined_loss(task, know, knowledge_weight)
    return LossParts(loss, float(task.detach()), float(know.detach()))


class QueryBatches:
    """Seeded epoch-wise shuffling of training queries with a resumable position.

    Position = (epoch, step within epoch); the permutation of an epoch depends only on
    ``seed`` and the epoch, so restoring the position restores the exact data order.
    ``shard`` / ``num_shards`` split each epoch's batches across data-parallel workers.
    """

    def __init__(self, queries: np.ndarray, batch_size: int, seed: int,
                 shard: int = 0, num_shards: int = 1) -> None:
        self.queries = torch.as_tensor(queries, dtype=torch.long)
        self.batch_size = batch_size
        self.seed = seed
        self.shard, self.num_shards = shard, num_shards
        self.epoch, self.step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        """Batches per worker per epoch (every worker gets the same number)."""
        return max(1, len(self.queries) // (self.batch_size * self.num_shards))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"data position was saved with seed {state['seed']}, "
                             f"this run uses {self.seed}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.queries), generator=g)

    def __iter__(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yields (epoch, step, batch) forever from the current position."""
        while True:
            order = self._order(self.epoch)
            while self.step < self.steps_per_epoch:
                global_batch = self.step * self.num_shards + self.shard
                idx = order[global_batch * self.batch_size : (global_batch + 1) * self.batch_size]
                epoch, step = self.epoch, self.step
                self.step += 1
                yield epoch, step, self.queries[idx]
            self.epoch, self.step = self.epoch + 1, 0

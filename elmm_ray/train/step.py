"""The training step shared by the local trainer and the Ray Train loop.

``compute_loss`` takes a batch of training queries ``(entity, qrel, answer)`` and returns
``L = L_task + lambda * L_knowledge``; the caller does backward/step (plain torch or a
DeepSpeed engine). ``QueryBatches`` yields shuffled batches from a seeded position so that
a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

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
    """``loss``: what this rank back-propagates (its share of the global batch's gradient,
    scaled so that the ranks' average, as data parallelism takes it, is the whole gradient);
    ``task`` / ``knowledge``: the global batch's loss terms (the same on every rank)."""

    loss: torch.Tensor
    task: float
    knowledge: float

    knowledge_weight: float = 0.0

    @property
    def value(self) -> float:
        """The global batch's loss ``task + lambda * knowledge``."""
        return self.task + self.knowledge_weight * self.knowledge


class Group(Protocol):
    """The data-parallel ranks a step spans (a training session)."""

    rank: int
    world: int

    def gather_rows(self, local: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Every rank's rows (rank r holds ``counts[r]``), concatenated in rank order; the
        gradient flows into this rank's own rows."""
        ...

    def all_sum(self, value: float) -> float:
        """``value`` summed over the ranks."""
        ...


class Solo:
    """One process: rank 0 of 1."""

    rank, world = 0, 1

    def gather_rows(self, local: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        return local

    def all_sum(self, value: float) -> float:
        return value


def split_counts(total: int, world: int) -> list[int]:
    """Rows per rank of ``total`` rows split into ``world`` contiguous parts (the first
    ``total % world`` one longer)."""
    return [total // world + (1 if r < total % world else 0) for r in range(world)]


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
    group: Group | None = None,
) -> LossParts:
    """Loss of one global batch of training queries (``(B, 3)``: entity, qrel, answer), the
    same objective whether one process or ``group``'s ranks compute it.

    Each rank encodes its contiguous part of the queries and an equal part of the
    candidates (answers, query entities, negatives of the whole batch); both are gathered,
    with the gradient flowing into the rank's own part, and every rank scores every query
    against every candidate: in-batch answers and sampled negatives are those of the global
    batch (``generator`` must be in the same state on every rank). Each rank's gradient is
    exactly its share of the global batch's gradient (every encoding belongs to one rank),
    scaled by the world size so that data parallelism's average of the ranks' gradients is
    their sum. L_knowledge (per query) is each rank's own queries'.

    ``num_hard_negatives``: that many more negatives, the highest-scoring non-answers of the
    queries against the model's entity vectors (with an encoder: its cache, refreshed every
    ``train.entity_refresh_every`` steps), added to the ``num_negatives`` sampled ones."""
    group = group or Solo()
    rank, world = group.rank, group.world
    entities, qrels, answers = queries[:, 0], queries[:, 1], queries[:, 2]
    device = next(model.parameters()).device
    counts = split_counts(len(queries), world)
    low = sum(counts[:rank])
    mine = slice(low, low + counts[rank])
    feats, image_mask = features.features_for(entities[mine])
    batch = collator(entities[mine], qrels[mine], feats, image_mask)
    own_queries = model.encode_queries({k: v.to(device) for k, v in batch.items()})
    query_vectors = group.gather_rows(own_queries, counts)
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
            hard = hard_negatives(model.score(query_vectors.detach()), answers, (rows, cols),
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
    vectors = _candidate_vectors(model, collator, features, candidates, group, device)
    task = contrastive_loss(query_vectors, vectors, local[answers].to(device),
                            local[entities].to(device), temperature=model.temperature,
                            negatives=None if negatives is None else local[negatives].to(device),
                            known_answers=known_local, use_in_batch=in_batch_negatives)
    know = torch.zeros((), device=device)
    if knowledge_weight > 0:
        own_rows, own_cols = known.mask_pairs(entities[mine].numpy(), qrels[mine].numpy())
        # A mean over the rows with known answers (every training query has its own): this
        # rank's share of the global batch's mean.
        know = knowledge_loss(model.score(own_queries), own_rows, own_cols) * (
            counts[rank] / len(queries))
    loss = world * combined_loss(task, know, knowledge_weight)
    knowledge = group.all_sum(float(know.detach())) if knowledge_weight > 0 else 0.0
    return LossParts(loss, float(task.detach()), knowledge, knowledge_weight)


def _candidate_vectors(model: ELMM, collator: QueryCollator, features: FeatureBank,
                       candidates: torch.Tensor, group: Group, device) -> torch.Tensor:
    """The vectors of ``candidates``, each computed with its gradient on one rank: rank r
    computes an equal contiguous part (padded with the last candidate, so every rank runs one
    forward of the same size, as ZeRO-3 needs), then all are gathered. With an encoder the
    gradient flows through the candidates' own encodings (a bi-encoder)."""
    world, rank = group.world, group.rank
    per = -(-len(candidates) // world)
    ids = candidates[min(rank * per, len(candidates) - 1):][:per]
    ids = torch.cat([ids, candidates[-1:].expand(per - len(ids))])
    counts = [max(0, min(per, len(candidates) - r * per)) for r in range(world)]
    if model.encodes_entities:
        cand_feats, cand_mask = features.features_for(ids)
        entity_batch = collator.entity_batch(ids, cand_feats, cand_mask)
        own = model.candidate_vectors(ids.to(device),
                                      {k: v.to(device) for k, v in entity_batch.items()})
    else:
        own = model.entity_vectors(ids.to(device))
    return group.gather_rows(own[:counts[rank]], counts)


class QueryBatches:
    """Seeded epoch-wise shuffling of training queries into global batches, with a resumable
    position that does not depend on the number of workers.

    Each optimizer step takes ``grad_accum`` micro-batches of ``batch_size`` queries (the
    global batch split in order); position = (epoch, optimizer step within the epoch); the
    permutation of an epoch depends only on ``seed`` and the epoch, so restoring the position
    restores the exact data order at any world size (each rank takes its part of every
    micro-batch, :func:`compute_loss`).
    """

    def __init__(self, queries: np.ndarray, batch_size: int, seed: int,
                 grad_accum: int = 1) -> None:
        self.queries = torch.as_tensor(queries, dtype=torch.long)
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.seed = seed
        self.epoch, self.step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (whole global batches; the remainder waits for the
        next epoch's permutation)."""
        return max(1, len(self.queries) // (self.batch_size * self.grad_accum))

    @property
    def samples_consumed(self) -> int:
        """Training queries taken so far, over all workers."""
        return (self.epoch * self.steps_per_epoch + self.step) * self.batch_size * self.grad_accum

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed,
                "global_batch": self.batch_size * self.grad_accum}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"data position was saved with seed {state['seed']}, "
                             f"this run uses {self.seed}")
        global_batch = self.batch_size * self.grad_accum
        if int(state.get("global_batch", global_batch)) != global_batch:
            raise ValueError(f"data position was saved with a global batch of "
                             f"{state['global_batch']} queries, this run uses {global_batch}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.queries), generator=g)

    def __iter__(self) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
        """Yields (epoch, step, the step's micro-batches) forever from the current position."""
        size = self.batch_size
        while True:
            order = self._order(self.epoch)
            while self.step < self.steps_per_epoch:
                first = self.step * self.grad_accum
                micro = [self.queries[order[(first + k) * size : (first + k + 1) * size]]
                         for k in range(self.grad_accum)]
                epoch, step = self.epoch, self.step
                self.step += 1
                yield epoch, step, micro
            self.epoch, self.step = self.epoch + 1, 0

"""Evaluate an ELMM: encode every query of a split, rank all entities, compute metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from elmm_ray.data.collate import QueryCollator
from elmm_ray.data.image_features import FeatureBank
from elmm_ray.data.kg import KnowledgeGraph
from elmm_ray.eval.ranking import evaluate_ranking, rank_with_vectors
from elmm_ray.models.elmm import ELMM


@torch.no_grad()
def encode_queries(model: ELMM, collator: QueryCollator, features: FeatureBank,
                   queries: np.ndarray, batch_size: int) -> torch.Tensor:
    """Normalised query vectors of ``(entity, qrel, ...)`` rows, in order."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(queries), batch_size):
        chunk = torch.as_tensor(queries[start : start + batch_size], dtype=torch.long)
        feats, mask = features.features_for(chunk[:, 0])
        batch = collator(chunk[:, 0], chunk[:, 1], feats, mask)
        out.append(model.encode_queries({k: v.to(device) for k, v in batch.items()}).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.embed_dim)


@torch.no_grad()
def encode_all_entities(model: ELMM, collator: QueryCollator, features: FeatureBank,
                        batch_size: int, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Each entity's own encoding (text + MVTC tokens), rows in the order of ``ids`` (default:
    every entity): the entity table's initial value and the encoder's cache. Runs in eval
    mode (no dropout), whatever mode the model is in."""
    device = next(model.parameters()).device
    ids = torch.arange(model.num_entities) if ids is None else torch.as_tensor(ids)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        feats, mask = features.features_for(chunk)
        batch = collator.entity_batch(chunk, feats, mask)
        out.append(model.encode_entities({k: v.to(device) for k, v in batch.items()}).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.embed_dim)


def refresh_entity_cache(model: ELMM, collator: QueryCollator, features: FeatureBank,
                         batch_size: int) -> None:
    """A fresh encoding of every entity into the model's cache (encoder entity modes)."""
    if model.encodes_entities:
        model.set_entity_cache(encode_all_entities(model, collator, features, batch_size))


def select_queries(kg: KnowledgeGraph, split: str, max_queries: int, seed: int = 0) -> np.ndarray:
    """Both directions of ``split``; ``max_queries`` > 0 keeps a seeded subset per direction."""
    queries = kg.queries(split)
    if not max_queries:
        return queries
    n = len(kg.triples[split])
    if n <= max_queries:
        return queries
    keep = np.sort(np.random.default_rng(seed).choice(n, max_queries, replace=False))
    return np.concatenate([queries[keep], queries[n + keep]])


@dataclass(frozen=True)
class Shard:
    """One rank's part of ``total`` items processed in batches of ``batch_size``: whole
    batches of the single-process order, contiguous (``start:stop``), so that every item
    goes through a batch of the same rows as in one process (batch composition changes float
    rounding: a row's result may depend on the rows beside it and the batch's padding). A rank
    with fewer batches than ``batches`` (the most any rank has) runs ``pad_batches`` dummy
    forwards, so that every rank runs the same forwards (as ZeRO-3 needs); its results are
    padded to ``rows`` (equal on every rank, for an all-gather: the gathered rows cut to
    ``total`` are the items in order)."""

    start: int
    stop: int
    batches: int
    pad_batches: int
    rows: int


def shard_of(total: int, rank: int, world: int, batch_size: int) -> Shard:
    """Rank ``rank`` of ``world``'s :class:`Shard` of ``total`` items in batches of
    ``batch_size``."""
    if batch_size < 1 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"no shard {rank} of {world} in batches of {batch_size}")
    batches = -(-total // batch_size)
    per_rank = -(-batches // world)  # whole batches per rank
    start = min(total, rank * per_rank * batch_size)
    stop = min(total, (rank + 1) * per_rank * batch_size)
    mine = -(-(stop - start) // batch_size)
    return Shard(start, stop, per_rank, per_rank - mine, per_rank * batch_size)


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` with zero rows appended up to ``rows`` (a shard's equal gather size)."""
    if len(tensor) >= rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(rows - len(tensor), *tensor.shape[1:])])


RANK_BATCH = 1024  # queries ranked at once ...
SCORE_BUDGET = 2**24  # ... within this many scores (64 MB of float32) per batch


def ranking_batch(num_entities: int) -> int:
    """Queries per ranking batch: 1,024, fewer where the ``(batch, entities)`` score matrix
    would pass :data:`SCORE_BUDGET` (WN18's 40,943 entities: 409), so that the memory of
    ranking stays flat in the number of entities."""
    return max(1, min(RANK_BATCH, SCORE_BUDGET // max(num_entities, 1)))


def aligned_ranking_batch(num_entities: int, batch_size: int) -> int:
    """Queries per ranking matrix product: the encoding batch ``batch_size``, or its largest
    divisor within :func:`ranking_batch`'s score budget, so that ranking batches start where
    encoding batches do in every :class:`Shard` (each query scored in a product of the same
    rows as in one process)."""
    budget = ranking_batch(num_entities)
    if budget >= batch_size:
        return batch_size
    return max(d for d in range(1, budget + 1) if batch_size % d == 0)


@torch.no_grad()
def rank_shard(model: ELMM, collator: QueryCollator, features: FeatureBank,
               kg: KnowledgeGraph, queries: np.ndarray, batch_size: int,
               shard: tuple[int, int] = (0, 1), *,
               pad_forwards: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Filtered ranks and top-1 entities of this rank's :class:`Shard` of ``queries`` (the
    entity cache, in encoder modes, must be fresh); sharded (``world > 1``), zero-padded to
    the shard's ``rows``, after the dummy forwards that keep the ranks in step
    (``pad_forwards``: ZeRO-3; Ray's evaluation actors, each with a whole model, need none).
    The figures of any sharding are those of one process, bit for bit."""
    rank, world = shard
    part = shard_of(len(queries), rank, world, batch_size)
    mine = queries[part.start : part.stop]
    vectors = encode_queries(model, collator, features, mine, batch_size)
    if pad_forwards and len(queries):
        for _ in range(part.pad_batches if world > 1 else 0):
            encode_queries(model, collator, features, queries[:1], batch_size)
    table = model.entity_vectors().float()  # ranked on the model's device
    result = rank_with_vectors(vectors.to(table.device), table, mine, kg.filter_index(),
                               batch_size=aligned_ranking_batch(len(table), batch_size),
                               cosine=True, temperature=model.temperature)
    if world == 1:
        return result.ranks, result.top1
    pad = part.rows - len(mine)
    return np.pad(result.ranks, (0, pad)), np.pad(result.top1, (0, pad))


def metrics_of(kg: KnowledgeGraph, split: str, queries: np.ndarray, ranks: np.ndarray,
               top1: np.ndarray, ks: Sequence[int] = (1, 3, 10)) -> dict:
    """The metrics of ranked ``queries`` (overall, per direction, category and relation)."""
    metrics = evaluate_ranking(ranks, top1, queries, kg.num_relations, kg.relation_categories,
                               kg.triples["train"], ks=ks, relation_names=kg.relation_texts)
    metrics["split"] = split
    metrics["num_queries"] = int(len(queries))
    return metrics


def evaluate_model(model: ELMM, collator: QueryCollator, features: FeatureBank,
                   kg: KnowledgeGraph, *, split: str = "test", batch_size: int = 256,
                   max_queries: int = 0, ks: Sequence[int] = (1, 3, 10),
                   shard: tuple[int, int] = (0, 1),
                   all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   refresh: bool = True) -> dict:
    """Filtered ranking metrics of ``split`` (both directions) against every entity.

    ``shard=(rank, world)`` with ``all_gather`` (every rank's equally shaped tensor,
    concatenated in rank order): each rank encodes and ranks its whole batches of the
    one-process order (:func:`shard_of`) and the ranks are gathered; every rank returns the
    metrics of all queries. ``refresh=False``: the caller has refreshed the entity cache already."""
    was_training = model.training
    model.eval()
    try:
        queries = select_queries(kg, split, max_queries)
        if refresh:
            refresh_entity_cache(model, collator, features, batch_size)  # a fresh encoding
        ranks, top1 = rank_shard(model, collator, features, kg, queries, batch_size, shard)
        if shard[1] > 1:
            if all_gather is None:
                raise ValueError("a sharded evaluation needs all_gather")
            both = torch.stack([torch.as_tensor(ranks, dtype=torch.float64),
                                torch.as_tensor(top1, dtype=torch.float64)], dim=1)
            gathered = all_gather(both)[:len(queries)].numpy()
            ranks = gathered[:, 0].astype(ranks.dtype)
            top1 = gathered[:, 1].astype(top1.dtype)
        return metrics_of(kg, split, queries, ranks, top1, ks)
    finally:
        model.train(was_training)

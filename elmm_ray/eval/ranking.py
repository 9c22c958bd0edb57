"""Filtered ranking over all entities: ranks, MRR / MR / Hits@k, per direction and category.

Queries follow :mod:`elmm_ray.data.kg`: rows ``(entity, qrel, answer)`` with ``qrel < R`` a
tail query ``(h, r, ?)`` and ``qrel >= R`` a head query ``(t, r^-1, ?)``. Filtering removes
every other known answer of the query (``kg.filter_index()``, all splits) before ranking the
target. Ties are counted at the mean rank of the tie (never optimistic):
``rank = 1 + #higher + #tied_others / 2``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

RELATION_CATEGORIES = ("1-1", "1-N", "N-1", "N-N")
DIRECTIONS = ("tail", "head")


class FilterLookup(Protocol):
    """What ranking needs of :class:`elmm_ray.data.kg.FilterIndex`."""

    def mask_pairs(self, entities: np.ndarray, qrels: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]: ...


class RankingResult(NamedTuple):
    """Filtered rank (float, ties at their mean) and filtered top-1 entity of each query."""

    ranks: np.ndarray
    top1: np.ndarray


def _index_tensor(values: Tensor | np.ndarray, device: torch.device) -> Tensor:
    if isinstance(values, Tensor):
        return values.to(device=device, dtype=torch.long)
    return torch.as_tensor(np.asarray(values), dtype=torch.long, device=device)


def filtered_ranks_and_top1(
    scores: Tensor,
    answers: Tensor | np.ndarray,
    filter_rows: Tensor | np.ndarray,
    filter_cols: Tensor | np.ndarray,
    *,
    in_place: bool = False,
) -> tuple[Tensor, Tensor]:
    """Filtered ranks ``(B,)`` float64 and filtered top-1 ids ``(B,)`` of a ``(B, E)`` score matrix.

    Every ``(row, col)`` filter pair except the row's target is set to -inf (on ``scores``
    itself when ``in_place``). A NaN target gets the worst rank (the number of candidates);
    NaN candidate scores count as below the target. Top-1 ties go to the lowest entity id.
    """
    if scores.dim() != 2:
        raise ValueError("scores must be (B, E)")
    if not in_place:
        scores = scores.clone()
    device = scores.device
    batch_size, num_entities = scores.shape
    answers = _index_tensor(answers, device)
    rows, cols = _index_tensor(filter_rows, device), _index_tensor(filter_cols, device)
    others = cols != answers[rows]
    rows, cols = rows[others], cols[others]

    target = scores.gather(1, answers.unsqueeze(1))
    scores[rows, cols] = float("-inf")
    # Two compare-and-count passes (int32 sums are much faster than int64 ones on CPU).
    higher = (scores > target).sum(1, dtype=torch.int32).long()
    ties = (scores >= target).sum(1, dtype=torch.int32).long() - higher - 1
    target = target.squeeze(1)
    ranks = 1.0 + higher.double() + ties.double() / 2.0
    not_finite_low = (target == float("-inf")) | torch.isnan(target)
    if bool(not_finite_low.any()):
        # Each filtered candidate once: a -inf target ties with every filtered (-inf) one,
        # and a NaN target ranks last among the remaining candidates.
        unique_keys = torch.unique(rows * num_entities + cols)
        filtered_per_row = torch.bincount(unique_keys // num_entities, minlength=batch_size)
        tie_ranks = 1.0 + higher.double() + (ties - filtered_per_row).double() / 2.0
        ranks = torch.where(target == float("-inf"), tie_ranks, ranks)
        ranks = torch.where(torch.isnan(target), (num_entities - filtered_per_row).double(), ranks)
    return ranks, scores.max(1).indices


def filtered_ranks(
    scores: Tensor,
    answers: Tensor | np.ndarray,
    filter_rows: Tensor | np.ndarray,
    filter_cols: Tensor | np.ndarray,
) -> Tensor:
    """Filtered rank ``(B,)`` (float64) of each row's answer; ``scores`` is left unchanged."""
    return filtered_ranks_and_top1(scores, answers, filter_rows, filter_cols)[0]


def rank_queries(
    score_fn: Callable[[Tensor, Tensor], Tensor],
    queries: np.ndarray,
    filter_index: FilterLookup,
    *,
    batch_size: int = 256,
) -> RankingResult:
    """Rank every query ``(entity, qrel, answer)`` with ``score_fn(entities, qrels) -> (b, E)``."""
    queries = np.asarray(queries, dtype=np.int64).reshape(-1, 3)
    ranks, top1 = [], []
    with torch.inference_mode():
        for start in range(0, len(queries), batch_size):
            batch = queries[start : start + batch_size]
            scores = score_fn(torch.from_numpy(batch[:, 0]), torch.from_numpy(batch[:, 1]))
            rows, cols = filter_index.mask_pairs(batch[:, 0], batch[:, 1])
            batch_ranks, batch_top1 = filtered_ranks_and_top1(scores, batch[:, 2], rows, cols)
            ranks.append(batch_ranks.cpu().numpy())
            top1.append(batch_top1.cpu().numpy())
    return _concat_result(ranks, top1)


def rank_with_vectors(
    query_vectors: Tensor | np.ndarray,
    entity_vectors: Tensor | np.ndarray,
    queries: np.ndarray,
    filter_index: FilterLookup,
    *,
    batch_size: int = 512,
    cosine: bool = False,
    temperature: float | Tensor = 1.0,
) -> RankingResult:
    """Rank queries whose vectors are precomputed (row i of ``query_vectors`` is query i):
    one matrix product per batch against all entities. ``cosine`` normalises both sides."""
    queries = np.asarray(queries, dtype=np.int64).reshape(-1, 3)
    if isinstance(temperature, Tensor):  # a learnable temperature arrives as a 0-d tensor
        temperature = float(temperature.detach())
    query_vectors = torch.as_tensor(query_vectors)
    entity_vectors = torch.as_tensor(entity_vectors).to(query_vectors.device)
    if len(query_vectors) != len(queries):
        raise ValueError(f"{len(query_vectors)} query vectors for {len(queries)} queries")
    ranks, top1 = [], []
    with torch.inference_mode():
        if cosine:
            entity_vectors = F.normalize(entity_vectors, dim=-1)
        # One score buffer reused by every batch (no fresh (B, E) allocation per batch).
        dtype = torch.promote_types(query_vectors.dtype, entity_vectors.dtype)
        buffer = torch.empty(min(batch_size, len(queries)), len(entity_vectors), dtype=dtype,
                             device=query_vectors.device)
        for start in range(0, len(queries), batch_size):
            batch = queries[start : start + batch_size]
            batch_vectors = query_vectors[start : start + batch_size]
            if cosine:
                batch_vectors = F.normalize(batch_vectors, dim=-1)
            scores = torch.matmul(batch_vectors, entity_vectors.T, out=buffer[: len(batch)])
            if temperature != 1.0:
                scores /= temperature
            rows, cols = filter_index.mask_pairs(batch[:, 0], batch[:, 1])
            batch_ranks, batch_top1 = filtered_ranks_and_top1(scores, batch[:, 2], rows, cols,
                                                              in_place=True)
            ranks.append(batch_ranks.cpu().numpy())
            top1.append(batch_top1.cpu().numpy())
    return _concat_result(ranks, top1)


def _concat_result(ranks: list[np.ndarray], top1: list[np.ndarray]) -> RankingResult:
    if not ranks:
        return RankingResult(np.zeros(0, dtype=np.float64), np.zeros(0, dtype=np.int64))
    return RankingResult(np.concatenate(ranks).astype(np.float64),
                         np.concatenate(top1).astype(np.int64))


def ranking_metrics(ranks: np.ndarray, ks: Sequence[int] = (1, 3, 10)) -> dict[str, float]:
    """``count``, ``mrr``, ``mr`` and ``hits@k`` (share of ranks ``<= k``); NaN when empty."""
    ranks = np.asarray(ranks, dtype=np.float64)
    empty = ranks.size == 0
    metrics: dict[str, float] = {
        "count": int(ranks.size),
        "mrr": float("nan") if empty else float(np.mean(1.0 / ranks)),
        "mr": float("nan") if empty else float(np.mean(ranks)),
    }
    for k in ks:
        metrics[f"hits@{k}"] = float("nan") if empty else float(np.mean(ranks <= k))
    return metrics


def allowed_entities(train_triples: np.ndarray, num_relations: int,
                     num_entities: int) -> np.ndarray:
    """Boolean ``(2R, E)`` matrix indexed by ``qrel``: row ``r`` marks the entities seen as a
    tail of ``r`` in training, row ``R + r`` those seen as a head of ``r``."""
    train_triples = np.asarray(train_triples, dtype=np.int64).reshape(-1, 3)
    allowed = np.zeros((2 * num_relations, num_entities), dtype=bool)
    allowed[train_triples[:, 1], train_triples[:, 2]] = True
    allowed[train_triples[:, 1] + num_relations, train_triples[:, 0]] = True
    return allowed


def type_violations(top1: np.ndarray, queries: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """True where the top-1 entity never fills that position of that relation in training."""
    top1 = np.asarray(top1, dtype=np.int64)
    qrels = np.asarray(queries, dtype=np.int64).reshape(-1, 3)[:, 1]
    in_range = top1 < allowed.shape[1]
    seen = np.zeros(len(top1), dtype=bool)
    seen[in_range] = allowed[qrels[in_range], top1[in_range]]
    return ~seen


def evaluate_ranking(
    ranks: np.ndarray,
    top1: np.ndarray,
    queries: np.ndarray,
    num_relations: int,
    relation_categories: Sequence[str],
    train_triples: np.ndarray,
    ks: Sequence[int] = (1, 3, 10),
    relation_names: Sequence[str] | None = None,
) -> dict:
    """Metrics (``ranking_metrics`` + ``type_violation``) for ``overall``, ``tail``, ``head``
    and ``categories[cat][tail|head|both]`` (categories without queries are left out); with
    ``relation_names``, also ``relations``: one entry per relation that has queries,
    ``{"relation": name, "id": r, "tail": ..., "head": ...}`` (a direction without queries
    left out), a list so that it stays out of the trackers' metrics (FB15k-237 has 237)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    top1 = np.asarray(top1, dtype=np.int64)
    queries = np.asarray(queries, dtype=np.int64).reshape(-1, 3)
    if not len(ranks) == len(top1) == len(queries):
        raise ValueError("ranks, top1 and queries must have one row per query")
    if len(relation_categories) != num_relations:
        raise ValueError(f"{len(relation_categories)} relation categories for "
                         f"{num_relations} relations")
    train_triples = np.asarray(train_triples, dtype=np.int64).reshape(-1, 3)
    num_entities = int(max(train_triples[:, [0, 2]].max(initial=-1), top1.max(initial=-1))) + 1
    violated = type_violations(top1, queries, allowed_entities(train_triples, num_relations,
                                                               num_entities))

    def subset(selected: np.ndarray) -> dict[str, float]:
        metrics = ranking_metrics(ranks[selected], ks)
        metrics["type_violation"] = (float(np.mean(violated[selected])) if selected.any()
                                     else float("nan"))
        return metrics

    is_tail = queries[:, 1] < num_relations
    relation = np.where(is_tail, queries[:, 1], queries[:, 1] - num_relations)
    category_of_relation = np.asarray(relation_categories, dtype=object)
    query_category = category_of_relation[relation] if len(queries) else np.zeros(0, object)
    everything = np.ones(len(queries), dtype=bool)
    result: dict = {"overall": subset(everything), "tail": subset(is_tail),
                    "head": subset(~is_tail), "categories": {}}
    for category in RELATION_CATEGORIES:
        in_category = query_category == category
        if not in_category.any():
            continue
        result["categories"][category] = {
            "tail": subset(in_category & is_tail),
            "head": subset(in_category & ~is_tail),
            "both": subset(in_category),
        }
    if relation_names is not None:
        if len(relation_names) != num_relations:
            raise ValueError(f"{len(relation_names)} relation names for {num_relations} "
                             "relations")
        result["relations"] = []
        for r, name in enumerate(relation_names):
            entry: dict = {"relation": str(name), "id": r}
            for direction, in_direction in (("tail", is_tail), ("head", ~is_tail)):
                selected = (relation == r) & in_direction
                if selected.any():
                    entry[direction] = subset(selected)
            if len(entry) > 2:
                result["relations"].append(entry)
    return result

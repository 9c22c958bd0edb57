"""L_task: ELMM's self-denoising contrastive loss (InfoNCE over a small candidate set).

Each query row scores a handful of candidates gathered from the entity table (never all
entities): the true answer, ``K`` sampled negatives, the other queries' answers in the batch
and the query entity itself. A candidate is a *negative* only if it differs from the answer,
is not another known answer of the query (training filter index: no test leakage) and has not
already appeared earlier in the row (each entity counts once). Invalid candidates score -inf.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IndexLike = Tensor | np.ndarray | Sequence[int]
KnownAnswers = tuple[IndexLike, IndexLike] | Tensor


def as_long_tensor(values: IndexLike, device: torch.device) -> Tensor:
    """Index array (tensor, numpy or list) as an int64 tensor on ``device``."""
    return torch.as_tensor(np.asarray(values) if not isinstance(values, Tensor) else values,
                           dtype=torch.long, device=device)


def pairs_to_mask(rows: IndexLike, cols: IndexLike, batch_size: int, num_entities: int,
                  device: torch.device | str | None = None) -> Tensor:
    """Dense boolean ``(batch_size, num_entities)`` mask, True at every ``(row, col)`` pair."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    mask = torch.zeros(batch_size, num_entities, dtype=torch.bool, device=device)
    rows_t, cols_t = as_long_tensor(rows, device), as_long_tensor(cols, device)
    if rows_t.numel():
        mask[rows_t, cols_t] = True
    return mask


def known_candidate_mask(candidates: Tensor, known: KnownAnswers | None,
                         num_entities: int) -> Tensor:
    """Which entries of a ``(B, C)`` candidate-id matrix are known answers of their row.

    ``known`` is ``(rows, cols)`` pairs (looked up by key, no dense ``(B, E)`` mask built) or a
    boolean ``(B, E)`` mask (gathered); ``None`` means nothing is known.
    """
    if known is None:
        return torch.zeros_like(candidates, dtype=torch.bool)
    if isinstance(known, Tensor):
        if known.dtype != torch.bool or known.dim() != 2:
            raise ValueError("a known-answer mask must be a boolean (B, E) tensor")
        return known.to(candidates.device).gather(1, candidates)
    rows, cols = (as_long_tensor(x, candidates.device) for x in known)
    if rows.numel() == 0:
        return torch.zeros_like(candidates, dtype=torch.bool)
    row_ids = torch.arange(candidates.shape[0], device=candidates.device).unsqueeze(1)
    candidate_keys = row_ids * num_entities + candidates
    return torch.isin(candidate_keys, rows * num_entities + cols)


def _first_occurrence(candidates: Tensor) -> Tensor:
    """True where an id appears in its row for the first time (left to right)."""
    sorted_ids, order = torch.sort(candidates, dim=1, stable=True)
    repeat = torch.zeros_like(sorted_ids, dtype=torch.bool)
    repeat[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    first = torch.empty_like(repeat)
    first.scatter_(1, order, ~repeat)
    return first


def sample_negatives(batch_size: int, num_negatives: int, num_entities: int,
                     generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> Tensor:
    """Uniformly sampled entity ids, ``(batch_size, num_negatives)`` int64 (with replacement)."""
    gen_device = generator.device if generator is not None else device
    ids = torch.randint(0, num_entities, (batch_size, num_negatives), generator=generator,
                        device=gen_device, dtype=torch.long)
    return ids.to(device) if device is not None else ids


def hard_negatives(scores: Tensor, answers: Tensor, known: KnownAnswers | None, count: int,
                   *, shared: bool) -> Tensor:
    """The ``count`` highest-scoring entities of each query that are neither its answer nor
    another known answer (``scores``: ``(B, E)``, no gradient needed), as negatives:
    ``(B, count)``, or with ``shared`` one set ``(1, <= count)`` for the whole batch (each
    row's best first, rows taking turns, each entity once; entities no row may use are never
    picked). Per row, a row with fewer than ``count`` usable entities gets unusable ones too,
    which the loss never counts as negatives (it masks answers and known answers)."""
    scores = scores.detach().float().clone()
    batch = torch.arange(scores.shape[0], device=scores.device)
    if known is not None:
        scores = scores.masked_fill(known if isinstance(known, Tensor) else pairs_to_mask(
            *known, scores.shape[0], scores.shape[1], scores.device), float("-inf"))
    scores[batch, answers.to(scores.device, torch.long)] = float("-inf")
    depth = min(scores.shape[1], count if not shared else -(-2 * count // len(batch)) + 1)
    top_scores, top_ids = scores.topk(depth, dim=1)
    if not shared:
        return top_ids
    order = [int(i) for i, s in zip(top_ids.T.flatten(), top_scores.T.flatten(), strict=True)
             if s > float("-inf")]  # rank 1 of every row, then rank 2, ...
    return torch.tensor(list(dict.fromkeys(order))[:count], dtype=torch.long).unsqueeze(0)


def contrastive_candidates(answers: Tensor, query_entities: Tensor, negatives: Tensor | None,
                           *, use_in_batch: bool = True, self_negative: bool = True) -> Tensor:
    """``(B, 1 + K + B + 1)`` candidate ids: answer, sampled, in-batch answers, query entity
    (the optional blocks left out)."""
    batch_size = answers.shape[0]
    blocks = [answers.unsqueeze(1)]
    if negatives is not None and negatives.numel():
        blocks.append(negatives.to(answers.device, torch.long))
    if use_in_batch:
        blocks.append(answers.unsqueeze(0).expand(batch_size, batch_size))
    if self_negative:
        blocks.append(query_entities.to(answers.device, torch.long).unsqueeze(1))
    return torch.cat(blocks, dim=1)


def contrastive_loss(
    query_vectors: Tensor,
    entity_table: Tensor,
    answers: Tensor,
    query_entities: Tensor,
    *,
    temperature: float | Tensor,
    negatives: Tensor | None = None,
    known_answers: KnownAnswers | None = None,
    use_in_batch: bool = True,
    self_negative: bool = True,
) -> Tensor:
    """L_task: mean InfoNCE (cosine / temperature) of each query's answer against its negatives.

    ``known_answers`` (training-known answers of each query: ``(rows, cols)`` pairs from
    ``FilterIndex.mask_pairs`` or a boolean ``(B, E)`` mask) are never negatives, which also
    makes the query entity a negative only when it is not a known answer.
    """
    if query_vectors.dim() != 2 or answers.dim() != 1:
        raise ValueError("query_vectors must be (B, d) and answers (B,)")
    device = query_vectors.device
    answers = answers.to(device, torch.long)
    query_entities = query_entities.to(device, torch.long)
    num_entities = entity_table.shape[0]
    queries = F.normalize(query_vectors, dim=-1)

    # Scores, block by block, in the same column order as contrastive_candidates.
    answer_vectors = F.normalize(entity_table[answers], dim=-1)
    score_blocks = [(queries * answer_vectors).sum(-1, keepdim=True)]
    if negatives is not None and negatives.numel():
        negative_vectors = F.normalize(entity_table[negatives.to(device, torch.long)], dim=-1)
        score_blocks.append(torch.einsum("bd,bkd->bk", queries, negative_vectors))
    if use_in_batch:
        score_blocks.append(queries @ answer_vectors.T)
    if self_negative:
        self_vectors = F.normalize(entity_table[query_entities], dim=-1)
        score_blocks.append((queries * self_vectors).sum(-1, keepdim=True))
    scores = torch.cat(score_blocks, dim=1) / temperature

    candidates = contrastive_candidates(answers, query_entities, negatives,
                                        use_in_batch=use_in_batch, self_negative=self_negative)
    valid = (candidates != answers.unsqueeze(1))
    valid &= ~known_candidate_mask(candidates, known_answers, num_entities)
    valid &= _first_occurrence(candidates)
    valid[:, 0] = True  # the positive
    scores = scores.masked_fill(~valid, float("-inf"))
    return -torch.log_softmax(scores.float(), dim=1)[:, 0].mean()

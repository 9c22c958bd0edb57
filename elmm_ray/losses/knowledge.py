"""L_knowledge (knowledge-guided pruning paper): multi-positive cross-entropy over all entities.

The target distribution of a query is uniform over all its KG-known answers, so the loss is
the mean over known answers of ``-log softmax(scores)[answer]``, averaged over the queries
that have at least one known answer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from elmm_ray.losses.contrastive import IndexLike, as_long_tensor


def knowledge_loss(all_scores: Tensor, known_rows: IndexLike, known_cols: IndexLike) -> Tensor:
    """Cross-entropy of ``softmax(all_scores)`` (``(B, E)``) against the uniform distribution
    on each row's known answers (``(row, col)`` pairs, unique, e.g. ``FilterIndex.mask_pairs``).
    Rows without known answers are left out; with none at all the loss is 0 (with a graph)."""
    if all_scores.dim() != 2:
        raise ValueError("all_scores must be (B, E)")
    device = all_scores.device
    rows, cols = as_long_tensor(known_rows, device), as_long_tensor(known_cols, device)
    if rows.numel() == 0:
        return all_scores.sum() * 0.0
    log_probs = torch.log_softmax(all_scores.float(), dim=1)
    picked = log_probs[rows, cols]
    batch_size = all_scores.shape[0]
    per_row_sum = torch.zeros(batch_size, device=device, dtype=picked.dtype).index_add(
        0, rows, picked)
    per_row_count = torch.bincount(rows, minlength=batch_size).to(picked.dtype)
    has_answers = per_row_count > 0
    per_row_loss = -per_row_sum[has_answers] / per_row_count[has_answers]
    return per_row_loss.mean()


def combined_loss(task: Tensor, knowledge: Tensor, knowledge_weight: float) -> Tensor:
    """Fine-tuning objective ``L_task + lambda * L_knowledge``."""
    return task + knowledge_weight * knowledge

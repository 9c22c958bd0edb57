"""Comparing the figures of two trainings that agree only to float tolerance.

Two computation paths (one process and 2 Ray workers, AVX512 and AVX2 kernels, another
CPU) give weights that differ by float rounding. Their ranking metrics can then differ too,
by more than any fixed epsilon: a query whose answer and a competitor score within rounding
of each other may swap them. The tolerance on the metrics is therefore derived from the
scores, not chosen: with ``eps`` the largest difference of any (query, entity) score between
the two models, every competitor more than ``2 * eps`` above (below) the answer in model A is
still above (below) it in model B, so B's rank of each query lies in an interval computed from
A's scores, and B's MRR and Hits@k within the intervals those give.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from elmm_ray.eval.evaluate import encode_queries, refresh_entity_cache, select_queries

# The evaluation scores in float32 (|score| <= 1 / temperature, ~20): its rounding against
# the float64 scores here, added to the measured difference of the two models.
FLOAT32_SLACK = 1e-4

__all__ = ["RankBounds", "assert_metrics_within_score_noise", "assert_weights_match",
           "query_scores"]

# Two trainings that agree to float rounding: the weights' bulk agrees to float noise
# (measured: mean 1e-6, 99th percentile 1e-6, after the tiny runs' 46-124 steps) ...
MEAN_WEIGHT_TOLERANCE = 1e-5
# ... and every weight with a gradient to 2e-4 (measured: at most 7e-6, 124 steps with two
# restarts at other worker counts). Gradient-free weights are held to the mean only: the key
# bias of an attention (it adds one constant to every key's logit of a query, to which the
# softmax is invariant) and, in MVTC's pooling attentions whose values are the raw context,
# the context norm's bias (it reaches the keys only). Their gradient is zero up to rounding,
# and AdamW, which divides each gradient by its own running magnitude, moves them by that
# noise at full step size: measured up to 3.5e-3 apart at lr 3e-3, with no effect on any
# score.
WEIGHT_TOLERANCE = 2e-4
GRADIENT_FREE = re.compile(r"attention\.key_proj\.bias$"
                           r"|(visual_pool|text_pool)\.attention\.context_norm\.bias$")


def assert_weights_match(a: dict, b: dict) -> dict:
    """Trained weights of two computation paths (one process and N workers, two CPUs):
    within the tolerances above. Returns the figures."""
    assert a.keys() == b.keys()
    diffs = {k: (a[k].float() - b[k].float()).abs() for k in a}
    mean = sum(d.sum().item() for d in diffs.values()) / sum(d.numel() for d in diffs.values())
    worst, name = max((d.max().item(), k) for k, d in diffs.items()
                      if not GRADIENT_FREE.search(k))
    assert mean <= MEAN_WEIGHT_TOLERANCE, f"mean weight difference {mean}"
    assert worst <= WEIGHT_TOLERANCE, f"largest weight difference {worst} ({name})"
    return {"mean": mean, "max": worst}


def query_scores(ctx, kg, split: str, max_queries: int = 0, batch_size: int = 64):
    """Every (query, entity) score of the model of ``ctx`` as its evaluation ranks them
    (cosine / temperature) and the filter of each query's other known answers (-inf)."""
    model = ctx.model.eval()
    queries = select_queries(kg, split, max_queries)
    with torch.no_grad():
        refresh_entity_cache(model, ctx.collator, ctx.features, batch_size)
        vectors = F.normalize(encode_queries(model, ctx.collator, ctx.features, queries,
                                             batch_size), dim=-1)
        table = F.normalize(model.entity_vectors().float(), dim=-1)
        scores = (vectors.double() @ table.double().T) / float(model.temperature)
    rows, cols = kg.filter_index().mask_pairs(queries[:, 0], queries[:, 1])
    answers = torch.as_tensor(queries[:, 2])
    keep = torch.as_tensor(cols) != answers[torch.as_tensor(rows)]
    filtered = torch.zeros_like(scores, dtype=torch.bool)
    filtered[torch.as_tensor(rows)[keep], torch.as_tensor(cols)[keep]] = True
    return queries, scores, filtered


@dataclass(frozen=True)
class RankBounds:
    """Per query, the best and worst filtered rank any model whose scores are within ``eps``
    of these can give (ties counted as :func:`filtered_ranks_and_top1` counts them)."""

    low: np.ndarray
    high: np.ndarray
    eps: float

    @classmethod
    def of(cls, scores: torch.Tensor, filtered: torch.Tensor, answers: np.ndarray,
           eps: float) -> RankBounds:
        target = scores.gather(1, torch.as_tensor(answers).view(-1, 1))
        competitor = ~filtered
        competitor[torch.arange(len(answers)), torch.as_tensor(answers)] = False
        surely_above = ((scores > target + 2 * eps) & competitor).sum(1)
        maybe_above = ((scores >= target - 2 * eps) & competitor).sum(1)
        return cls((1 + surely_above).numpy().astype(float),
                   (1 + maybe_above).numpy().astype(float), eps)

    def metric_range(self, key: str) -> tuple[float, float]:
        """The interval of the mean metric ``key`` ('mrr', 'hits@K') over these queries."""
        if key == "mrr":
            return float(np.mean(1.0 / self.high)), float(np.mean(1.0 / self.low))
        k = int(key.split("@")[1])
        return float(np.mean(self.high <= k)), float(np.mean(self.low <= k))


def assert_metrics_within_score_noise(ctx_a, ctx_b, kg, metrics_b: dict, split: str = "test",
                                      max_queries: int = 0, max_eps: float = 1e-2,
                                      keys=("mrr", "hits@1", "hits@3", "hits@10")) -> dict:
    """``metrics_b`` (model B's evaluation of ``split``: its ``overall`` figures) lie within
    the intervals that model A's scores and the two models' largest score difference allow;
    that difference itself stays under ``max_eps`` (two trainings that agree to float
    tolerance). Returns the figures: eps, the metric intervals, the queries near a tie."""
    queries, scores_a, filtered = query_scores(ctx_a, kg, split, max_queries)
    _, scores_b, _ = query_scores(ctx_b, kg, split, max_queries)
    measured = float((scores_a - scores_b).abs().max())
    assert measured < max_eps, f"scores differ by {measured} (more than {max_eps}): not noise"
    bounds = RankBounds.of(scores_a, filtered, queries[:, 2], measured + FLOAT32_SLACK)
    report = {"eps": bounds.eps, "near_ties": int(np.sum(bounds.low != bounds.high)),
              "queries": len(queries)}
    for key in keys:
        lo, hi = bounds.metric_range(key)
        got = metrics_b["overall"][key]
        assert lo - 1e-12 <= got <= hi + 1e-12, (key, got, lo, hi, report)
        report[key] = (lo, hi)
    return report

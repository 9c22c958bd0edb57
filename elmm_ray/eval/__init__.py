"""elmm_ray.eval: filtered ranking over all entities and its reports."""

from elmm_ray.eval.ranking import (
    RankingResult,
    allowed_entities,
    evaluate_ranking,
    filtered_ranks,
    filtered_ranks_and_top1,
    rank_queries,
    rank_with_vectors,
    ranking_metrics,
    type_violations,
)
from elmm_ray.eval.report import format_metrics_table, write_metrics_json

__all__ = [
    "RankingResult",
    "allowed_entities",
    "evaluate_ranking",
    "filtered_ranks",
    "filtered_ranks_and_top1",
    "format_metrics_table",
    "rank_queries",
    "rank_with_vectors",
    "ranking_metrics",
    "type_violations",
    "write_metrics_json",
]

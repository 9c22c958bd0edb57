"""elmm_ray.pruning: attention-layer pruning with compensation (ELMM) and structured pruning
of KV groups and MLP neurons (knowledge-guided, magnitude, random), with physical removal.

Every method has the same shape (:class:`Pruner`: score -> plan -> apply -> report) and
lives in :data:`PRUNERS`. Pure PyTorch: no Ray, no DeepSpeed. The stage that reads the
config is :mod:`elmm_ray.stages.prune`; the modules and in-place edits that change the
model's shape, and the pruned backbone's file format, live in :mod:`elmm_ray.models.surgery`
and :mod:`elmm_ray.models.pruned`.
"""

from elmm_ray.pruning.attention import AttentionPruner, attention_similarity
from elmm_ray.pruning.base import CalibrationData, PruneOptions, Pruner, sample_queries
from elmm_ray.pruning.compensation import fit_compensation
from elmm_ray.pruning.structured import (
    KnowledgePruner,
    MagnitudePruner,
    RandomPruner,
    StructuredPruner,
    knowledge_importance,
    plan_removal,
    remove_units,
)

PRUNERS: dict[str, type[Pruner]] = {
    "attention": AttentionPruner,
    "knowledge": KnowledgePruner,
    "magnitude": MagnitudePruner,
    "random": RandomPruner,
}


def make_pruner(method: str, options: PruneOptions | None = None) -> Pruner:
    """The pruner registered under ``method``."""
    try:
        return PRUNERS[method](options)
    except KeyError:
        raise ValueError(f"unknown pruning method {method!r}; choose one of "
                         f"{', '.join(PRUNERS)}") from None


__all__ = [
    "PRUNERS",
    "AttentionPruner",
    "CalibrationData",
    "KnowledgePruner",
    "MagnitudePruner",
    "PruneOptions",
    "Pruner",
    "RandomPruner",
    "StructuredPruner",
    "attention_similarity",
    "fit_compensation",
    "knowledge_importance",
    "make_pruner",
    "plan_removal",
    "remove_units",
    "sample_queries",
]

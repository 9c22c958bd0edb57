"""The shape every pruner shares (score -> plan -> apply -> report) and its inputs.

A pruner is built from :class:`PruneOptions` (plain values; ``pruning/run.py`` fills them
from the config) and works on an :class:`~elmm_ray.models.elmm.ELMM` with
:class:`CalibrationData` (KG queries + the collator and image features to encode them)::

    pruner = PRUNERS["knowledge"](PruneOptions(importance="squared"))
    report = pruner.prune(model, data, amount=0.3)   # = apply(plan(score(...)))

``amount`` is the method's target: for the structured pruners the share of the original
prunable LLM parameters removed *in total* (so an iterative schedule passes 0.1, 0.2,
0.3), for attention-layer pruning the share of decoder layers (0 = use the threshold).
LoRA adapters must be merged (or not yet applied) before pruning.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from elmm_ray.data.collate import QueryCollator
from elmm_ray.data.image_features import FeatureBank
from elmm_ray.data.kg import FilterIndex
from elmm_ray.models.elmm import ELMM


@dataclass
class PruneOptions:
    """Settings of every pruner (each reads the ones it needs)."""

    threshold: float = 0.8
    importance: str = "squared"
    scope: str = "global"
    min_heads_per_layer: int = 1
    min_neurons_per_layer: int = 8
    compensation_rank: int = 0
    compensation: str = "linear"
    ridge: float = 1e-3
    fit_bias: bool = True
    grad_batch_size: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.importance not in ("squared", "taylor"):
            raise ValueError(f"importance must be 'squared' or 'taylor', got {self.importance!r}")
        if self.scope not in ("global", "per_layer"):
            raise ValueError(f"scope must be 'global' or 'per_layer', got {self.scope!r}")
        if self.compensation not in ("linear", "linear_mean"):
            raise ValueError("compensation must be 'linear' or 'linear_mean', got "
                             f"{self.compensation!r}")
        if self.min_heads_per_layer < 1 or self.min_neurons_per_layer < 1:
            raise ValueError("min_heads_per_layer and min_neurons_per_layer must be >= 1")
        if self.grad_batch_size < 1:
            raise ValueError("grad_batch_size must be >= 1")


@dataclass
class CalibrationData:
    """KG samples for calibration and importance estimation.

    ``queries`` are ``(entity, qrel, answer)`` rows (training queries); ``known`` holds the
    training-known answers (the targets of L_knowledge); ``holdout`` optional extra queries
    on which attention pruning also reports its reconstruction errors.
    """

    collator: QueryCollator
    features: FeatureBank
    queries: np.ndarray
    known: FilterIndex
    batch_size: int = 16
    holdout: np.ndarray | None = None

    def batches(
        self, queries: np.ndarray | None = None, batch_size: int | None = None,
        device: torch.device | str = "cpu",
    ) -> Iterator[tuple[dict[str, torch.Tensor], np.ndarray]]:
        """Collated batches (on ``device``) with their query rows, in order."""
        queries = self.queries if queries is None else queries
        size = batch_size or self.batch_size
        for start in range(0, len(queries), size):
            chunk = np.asarray(queries[start : start + size], dtype=np.int64)
            ids = torch.as_tensor(chunk[:, 0])
            feats, mask = self.features.features_for(ids)
            batch = self.collator(ids, torch.as_tensor(chunk[:, 1]), feats, mask)
            yield {k: v.to(device) for k, v in batch.items()}, chunk


def sample_queries(queries: np.ndarray, count: int, seed: int) -> np.ndarray:
    """A seeded subset of ``count`` rows (all rows, shuffled, when there are fewer)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(queries))[: min(count, len(queries))]
    return np.asarray(queries, dtype=np.int64)[order]


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class Pruner(ABC):
    """score -> plan -> apply; :meth:`prune` runs the three and returns the report."""

    name: ClassVar[str] = ""

    def __init__(self, options: PruneOptions | None = None) -> None:
        self.options = options or PruneOptions()

    @abstractmethod
    def score(self, model: ELMM, data: CalibrationData) -> Any:
        """Importance (structured) or redundancy (attention) scores of the prunable units."""

    @abstractmethod
    def plan(self, model: ELMM, scores: Any, amount: float) -> Any:
        """Which units to remove to reach ``amount`` (see the module docstring)."""

    @abstractmethod
    def apply(self, model: ELMM, plan: Any, data: CalibrationData) -> dict:
        """Change ``model`` in place; return a JSON-able report."""

    def prune(self, model: ELMM, data: CalibrationData, amount: float) -> dict:
        """One pruning round: score, plan and apply. Returns the report."""
        was_training = model.training
        model.eval()
        try:
            scores = self.score(model, data)
            plan = self.plan(model, scores, amount)
            report = self.apply(model, plan, data)
        finally:
            model.train(was_training)
        return {"method": self.name, "amount": float(amount), **report}

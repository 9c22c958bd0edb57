"""elmm_ray.losses: L_task (contrastive, self-denoising) and L_knowledge (multi-positive)."""

from elmm_ray.losses.contrastive import (
    contrastive_candidates,
    contrastive_loss,
    hard_negatives,
    known_candidate_mask,
    pairs_to_mask,
    sample_negatives,
)
from elmm_ray.losses.knowledge import combined_loss, knowledge_loss

__all__ = [
    "combined_loss",
    "contrastive_candidates",
    "contrastive_loss",
    "hard_negatives",
    "knowledge_loss",
    "known_candidate_mask",
    "pairs_to_mask",
    "sample_negatives",
]

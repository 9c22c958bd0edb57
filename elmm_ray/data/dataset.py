"""The knowledge graph a config names, loaded from where the run layout says it is."""

from __future__ import annotations

from elmm_ray.config import Config
from elmm_ray.data.kg import KnowledgeGraph, load_kg
from elmm_ray.layout import RunLayout


def load_dataset(cfg: Config) -> KnowledgeGraph:
    """``dataset.path`` (or the run's generated ``data/``) in ``dataset.format``."""
    return load_kg(RunLayout.of(cfg).dataset_dir, format=cfg.dataset.format,
                   image_root=cfg.dataset.image_root or None,
                   use_long_text=cfg.dataset.use_long_text, name=cfg.dataset.name)

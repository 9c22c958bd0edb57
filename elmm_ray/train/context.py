"""Everything a trainer or evaluator needs, built the same way in every process.

The tokenizer and (for the tiny backbone) the random-init backbone weights are written
into the run directory the first time and loaded from there afterwards, so that every
Ray worker, a resumed run and ``elmm-ray eval`` see exactly the same frozen weights.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from elmm_ray.config import Config
from elmm_ray.data.collate import QueryCollator
from elmm_ray.data.image_features import FeatureBank, features_from_shards
from elmm_ray.data.kg import KnowledgeGraph
from elmm_ray.models.backbone import image_feature_shape, vision_tower_of
from elmm_ray.models.build import build_elmm, build_tokenizer, reads_images
from elmm_ray.models.elmm import ELMM
from elmm_ray.models.lora import apply_lora, set_trainable
from elmm_ray.models.tokenizer import load_tokenizer
from elmm_ray.rundir import RunDir

log = logging.getLogger(__name__)


@dataclass
class ModelContext:
    """A built model with its tokenizer, collator and image features."""

    model: ELMM
    tokenizer: object
    collator: QueryCollator
    features: FeatureBank


def entity_texts(kg: KnowledgeGraph) -> list[str]:
    return [kg.entity_text(i) for i in range(kg.num_entities)]


def get_tokenizer(cfg: Config, kg: KnowledgeGraph, run_dir: RunDir):
    """The run's tokenizer: trained once on the dataset's texts (tiny) and saved."""
    path = run_dir.path("tokenizer")
    if path.is_dir():
        return load_tokenizer(path)
    tokenizer = build_tokenizer(cfg, entity_texts(kg) + list(kg.relation_texts))
    run_dir.root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=run_dir.root))
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, path)
    except OSError:
        if not path.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


def backbone_source(cfg: Config, kg: KnowledgeGraph, run_dir: RunDir) -> str:
    """Where every process loads the backbone from: the checkpoint id/dir of the config, or
    for the tiny backbone ``<run_dir>/backbone`` (built from the seed and saved once)."""
    if cfg.model.backbone != "tiny":
        return cfg.model.backbone
    saved = run_dir.path("backbone")
    if not (saved / "config.json").is_file():
        tokenizer = get_tokenizer(cfg, kg, run_dir)
        model = build_elmm(cfg, num_entities=kg.num_entities, tokenizer=tokenizer)
        # Written aside and renamed into place: concurrent processes never see half a
        # backbone, and the first one to finish wins (all build the same seeded weights).
        tmp = Path(tempfile.mkdtemp(prefix=".backbone.", dir=run_dir.root))
        model.backbone.save_pretrained(tmp)
        try:
            os.rename(tmp, saved)
        except OSError:
            if not (saved / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return str(saved)


def build_model(cfg: Config, kg: KnowledgeGraph, tokenizer, run_dir: RunDir) -> ELMM:
    """The ELMM of ``cfg`` over the run's backbone (see :func:`backbone_source`), with LoRA
    when enabled."""
    source = backbone_source(cfg, kg, run_dir)
    effective = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone=source))
    model = build_elmm(effective, num_entities=kg.num_entities, tokenizer=tokenizer)
    if cfg.lora.enabled:
        apply_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                   target_regex=cfg.lora.target_regex)
    else:
        set_trainable(model, train_llm=True)
    return model


def build_features(cfg: Config, model: ELMM, kg: KnowledgeGraph, shard_dir: Path):
    """Image features of every entity: none when the model reads no images; the extracted
    feature store when there is one (refused if it does not match the model); else computed
    in this process from the image shards."""
    max_images = cfg.images.max_images_per_entity
    if not reads_images(cfg) or max_images == 0:
        tokens, width = image_feature_shape(model.backbone, cfg.model.feature_pool)
        return FeatureBank.empty(kg.num_entities, max_images, tokens, width)
    from elmm_ray.data.features import open_feature_store

    try:
        store = open_feature_store(cfg, backbone_source(cfg, kg, RunDir(cfg.run_dir)))
    except FileNotFoundError:
        store = None
    if store is not None:
        if store.num_entities != kg.num_entities:
            raise ValueError(f"the feature store has {store.num_entities} entities but the "
                             f"dataset has {kg.num_entities}; it belongs to another dataset")
        return store
    vision = model.backbone.config.vision_config
    return features_from_shards(vision_tower_of(model.backbone), shard_dir,
                                num_entities=kg.num_entities, max_images=max_images,
                                image_size=vision.image_size,
                                layer=cfg.model.vision_feature_layer, pool=cfg.model.feature_pool)


def build_context(cfg: Config, kg: KnowledgeGraph, run_dir: RunDir, shard_dir: Path,
                  features: FeatureBank | None = None) -> ModelContext:
    torch.manual_seed(cfg.train.seed)
    tokenizer = get_tokenizer(cfg, kg, run_dir)
    model = build_model(cfg, kg, tokenizer, run_dir)
    collator = QueryCollator(tokenizer, entity_texts(kg), kg.relation_texts, kg.num_relations,
                             cfg.model.max_text_tokens)
    if features is None:
        features = build_features(cfg, model, kg, shard_dir)
    set_visual_summaries(model, features)
    return ModelContext(model, tokenizer, collator, features)


def set_visual_summaries(model: ELMM, features, chunk: int = 256) -> None:
    """Give the entity table's image pathway every entity's pooled features."""
    for start in range(0, model.num_entities, chunk):
        ids = torch.arange(start, min(start + chunk, model.num_entities))
        feats, mask = features.features_for(ids)
        model.entity_table.set_visual_summary(feats, mask, start)

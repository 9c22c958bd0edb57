"""Everything a trainer or evaluator needs, built the same way in every process.

The tokenizer and (for the tiny backbone) the random-init backbone weights are written
into the run directory the first time and loaded from there afterwards, so that every
Ray worker, a resumed run and ``elmm-ray eval`` see exactly the same frozen weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from elmm_ray.config import Config
from elmm_ray.data.collate import QueryCollator
from elmm_ray.data.feature_store import open_feature_store
from elmm_ray.data.image_features import FeatureBank, features_from_shards
from elmm_ray.data.kg import KnowledgeGraph
from elmm_ray.layout import BEST_RECORD, BEST_SUBDIR, RunLayout, read_json, tower_reference
from elmm_ray.models.backbone import image_feature_shape, vision_tower_of
from elmm_ray.models.build import (
    build_elmm,
    build_tokenizer,
    composed_backbone,
    reads_images,
    tiny_backbone,
)
from elmm_ray.models.elmm import ELMM
from elmm_ray.models.hub import is_hub_id, prefetch
from elmm_ray.models.lora import apply_lora, load_trainable, lora_layers, set_trainable
from elmm_ray.models.pruned import MODEL_BACKBONE_SUBDIR, load_pruned_weights
from elmm_ray.models.surgery import LinearCompensation
from elmm_ray.models.tokenizer import load_tokenizer
from elmm_ray.models.towers import composed_identity, pixel_spec, save_composed
from elmm_ray.ray_session import on_every_other_node

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


def get_tokenizer(cfg: Config, kg: KnowledgeGraph, layout: RunLayout):
    """The run's tokenizer: trained once on the dataset's texts (tiny) and saved."""
    path = layout.tokenizer
    if path.is_dir():
        return load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code)
    tokenizer = build_tokenizer(cfg, entity_texts(kg) + list(kg.relation_texts))
    layout.root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=layout.root))
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, path)
    except OSError:
        if not path.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


_FETCHED_ON: dict[str, set[str]] = {}  # hub id -> the other nodes it was fetched on


def prepare_backbone(cfg: Config) -> list[str]:
    """On the driver, before a stage's actors or workers load ``model.backbone``: a hub
    checkpoint is fetched once into this node's HF cache and, when Ray is up with several
    nodes, once into every other node's (:func:`elmm_ray.models.hub.prefetch` under the
    node's lock); they then load it from there with ``local_files_only``. Tiny or a local
    directory: nothing. Returns the other nodes fetched on by this call."""
    name, code = cfg.model.backbone, cfg.model.trust_remote_code
    if not is_hub_id(name):
        return []
    prefetch(name, trust_remote_code=code)
    nodes = on_every_other_node(_prefetch_task, name, code,
                                done=_FETCHED_ON.setdefault(name, set()))
    if nodes:
        log.info("backbone %s fetched once on each of %d more nodes", name, len(nodes))
    return nodes


def _prefetch_task(name: str, trust_remote_code: bool) -> None:
    prefetch(name, trust_remote_code=trust_remote_code)


def backbone_source(cfg: Config, kg: KnowledgeGraph, layout: RunLayout) -> str:
    """Where every process loads the backbone from: the checkpoint id/dir of the config, or
    ``<run_dir>/backbone``, built and saved once, for the tiny backbone (from the seed) and
    for a backbone with ``model.vision_tower`` (the tower joined to the LLM)."""
    if cfg.model.backbone != "tiny" and not cfg.model.vision_tower:
        return cfg.model.backbone
    saved = layout.backbone
    identity = _composition(cfg)
    if (saved / "config.json").is_file():
        built = composed_identity(saved)
        if built != identity:
            raise ValueError(f"{saved} was built from {built or 'the tiny random tower'}, not "
                             f"{identity or 'the tiny random tower'}; use a new run_dir (or "
                             f"delete {saved})")
        return str(saved)
    tokenizer = get_tokenizer(cfg, kg, layout)
    processor = None
    with torch.random.fork_rng(devices=[]):  # as build_elmm seeds it
        torch.manual_seed(cfg.seed)
        if identity:
            backbone, processor = composed_backbone(cfg, tokenizer)
        else:
            backbone = tiny_backbone(cfg, tokenizer)
    # Written aside and renamed into place: concurrent processes never see half a
    # backbone, and the first one to finish wins (all build the same seeded weights).
    tmp = Path(tempfile.mkdtemp(prefix=".backbone.", dir=layout.root))
    if identity:
        save_composed(backbone, processor, tmp, identity)
    else:
        backbone.save_pretrained(tmp)
    try:
        os.rename(tmp, saved)
    except OSError:
        if not (saved / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return str(saved)


def _composition(cfg: Config) -> dict | None:
    """What a composed backbone of ``cfg`` is made of (None: no standalone tower)."""
    m = cfg.model
    if not m.vision_tower:
        return None
    identity = {"vision_tower": tower_reference(m.vision_tower), "backbone": m.backbone,
                "seed": cfg.seed, "vision_feature_layer": m.vision_feature_layer,
                "dtype": m.dtype}
    if m.backbone == "tiny":
        identity["tiny_llm"] = [m.llm_hidden, m.llm_layers, m.llm_heads, m.llm_kv_heads,
                                m.llm_intermediate, m.vocab_size]
        # The tiny LLM is taken from a whole seeded tiny LLaVA, whose random tower of these
        # sizes is drawn first: they decide the LLM's draw (models/build.composed_backbone).
        identity["tiny_draw"] = [m.vision_hidden, m.vision_layers, m.vision_heads,
                                 m.image_size, m.patch_size]
    return identity


def build_model(cfg: Config, kg: KnowledgeGraph, tokenizer, layout: RunLayout,
                feature_width: int | None = None) -> ELMM:
    """The ELMM of ``cfg`` over the run's backbone (see :func:`backbone_source`), with LoRA
    when enabled, reading visual features ``feature_width`` wide (None: the tower's)."""
    source = backbone_source(cfg, kg, layout)
    effective = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone=source))
    model = build_elmm(effective, num_entities=kg.num_entities, tokenizer=tokenizer,
                       feature_width=feature_width)
    if cfg.lora.enabled:
        apply_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                   target_regex=cfg.lora.target_regex)
    else:
        set_trainable(model, train_llm=True)
    return model


def _checked(store, kg: KnowledgeGraph):
    if store.num_entities != kg.num_entities:
        raise ValueError(f"the feature store has {store.num_entities} entities but the "
                         f"dataset has {kg.num_entities}; it belongs to another dataset")
    return store


def embedding_features(cfg: Config, kg: KnowledgeGraph):
    """The feature store written from ``dataset.visual_embeddings`` (it decides the model's
    visual input width), or None when the config has none or the model reads no images."""
    if (not cfg.dataset.visual_embeddings.path or not reads_images(cfg)
            or cfg.images.max_images_per_entity == 0):
        return None
    try:
        return _checked(open_feature_store(cfg, source=""), kg)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} (with dataset.visual_embeddings.path set, `elmm-ray "
                                "extract` writes it from the embedding file)") from err


def build_features(cfg: Config, model: ELMM, kg: KnowledgeGraph):
    """Image features of every entity: none when the model reads no images; the store of
    precomputed embeddings when configured; the extracted feature store when there is one
    (refused if it does not match the model); else computed in this process from the image
    shards."""
    max_images = cfg.images.max_images_per_entity
    if not reads_images(cfg) or max_images == 0:
        tokens, width = image_feature_shape(model.backbone, cfg.model.feature_pool)
        return FeatureBank.none(kg.num_entities, max_images, tokens, width)
    if cfg.dataset.visual_embeddings.path:
        return embedding_features(cfg, kg)
    try:
        store = open_feature_store(cfg, backbone_source(cfg, kg, RunLayout.of(cfg)))
    except FileNotFoundError:
        store = None
    if store is not None:
        return _checked(store, kg)
    vision = model.backbone.config.vision_config
    RunLayout.of(cfg).pull_shards()  # a remote run directory: the shards, on this node
    pixels = pixel_spec(backbone_source(cfg, kg, RunLayout.of(cfg)), vision)
    return features_from_shards(vision_tower_of(model.backbone), RunLayout.of(cfg).shard_dir,
                                num_entities=kg.num_entities, max_images=max_images,
                                image_size=vision.image_size, pixels=pixels,
                                layer=cfg.model.vision_feature_layer, pool=cfg.model.feature_pool)


def build_context(cfg: Config, kg: KnowledgeGraph, features: FeatureBank | None = None
                  ) -> ModelContext:
    """A fresh (untrained, seeded) model of ``cfg`` with LoRA when enabled."""
    layout = RunLayout.of(cfg)
    torch.manual_seed(cfg.train.seed)
    tokenizer = get_tokenizer(cfg, kg, layout)
    if features is None:
        features = embedding_features(cfg, kg)
    model = build_model(cfg, kg, tokenizer, layout, feature_width=_width(features))
    return _context(cfg, kg, model, tokenizer, features)


def _width(features) -> int | None:
    return None if features is None else int(features.feature_shape[1])


def _context(cfg: Config, kg: KnowledgeGraph, model: ELMM, tokenizer,
             features: FeatureBank | None) -> ModelContext:
    collator = QueryCollator(tokenizer, entity_texts(kg), kg.relation_texts, kg.num_relations,
                             cfg.model.max_text_tokens)
    if features is None:
        features = build_features(cfg, model, kg)
    set_visual_summaries(model, features)
    return ModelContext(model, tokenizer, collator, features)


def load_trained_context(cfg: Config, kg: KnowledgeGraph, model_dir: Path | None = None,
                         features: FeatureBank | None = None) -> ModelContext:
    """The run's model with its trained weights (LoRA not merged): ``model_dir`` or the
    train stage's ``<run_dir>/train/model``."""
    model_dir = Path(model_dir) if model_dir else RunLayout.of(cfg).trained_model
    if not (model_dir / "trainable.json").is_file():
        raise FileNotFoundError(f"no trained model at {model_dir}; run `elmm-ray train` first")
    ctx = build_context(cfg, kg, features=features)
    load_trainable(ctx.model, model_dir)
    return ctx


def load_pruned_context(cfg: Config, kg: KnowledgeGraph, model_dir: Path | None = None,
                        features: FeatureBank | None = None,
                        trainable_dir: Path | None = None) -> ModelContext:
    """A pruned model saved by :func:`elmm_ray.models.pruned.save_pruned_model` (default
    ``<run_dir>/prune/model``): the run's backbone reshaped and loaded from ``backbone/``,
    then its trainable tensors (adapters, MVTC, heads, entity table), from
    ``trainable_dir`` when given (e.g. the best round of the last fine-tuning)."""
    layout = RunLayout.of(cfg)
    model_dir = Path(model_dir) if model_dir else layout.pruned_model
    tokenizer = get_tokenizer(cfg, kg, layout)
    source = backbone_source(cfg, kg, layout)
    effective = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone=source))
    if features is None:
        features = embedding_features(cfg, kg)
    model = build_elmm(effective, num_entities=kg.num_entities, tokenizer=tokenizer,
                       feature_width=_width(features))
    load_pruned_weights(model, model_dir / MODEL_BACKBONE_SUBDIR)
    load_trainable(model, trainable_dir or model_dir)
    return _context(cfg, kg, model, tokenizer, features)


CHECKPOINTS = ("best", "last")


def _last_record(out: Path) -> dict | None:
    """The last validation record of the training in ``out``: its ``summary.json`` (rank 0
    always writes it), else ``metrics.jsonl`` (only with ``jsonl`` in ``train.loggers``)."""
    summary = out / "summary.json"
    if summary.is_file():
        history = json.loads(summary.read_text()).get("history") or []
        return history[-1] if history else None
    lines = (out / "metrics.jsonl").read_text().splitlines() \
        if (out / "metrics.jsonl").is_file() else []
    return json.loads(lines[-1]) if lines else None


def final_checkpoint(cfg: Config, checkpoint: str) -> dict:
    """Which weights are the run's final model, as ``checkpoint`` (``best`` or ``last``)
    means them: ``pruned``, ``trainable_dir`` (the trainable tensors to load) and the
    validation record of that round (``step``, ``val_mrr``, ...; ``None`` when unknown).

    Unpruned: ``last`` = ``train/model``, ``best`` = ``train/best``. Pruned (prune.method
    set and ``prune/model`` saved): ``last`` = ``prune/model``, ``best`` = the best round of
    the last pruning round's fine-tuning, ``prune/finetune_<k>/best`` (earlier rounds have
    another architecture). A missing best checkpoint is an error saying the way out."""
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint {checkpoint!r} is not one of {', '.join(CHECKPOINTS)}")
    layout = RunLayout.of(cfg)
    pruned = cfg.prune.method != "none" and layout.pruned_model.is_dir()
    if pruned:
        rounds = 1 if cfg.prune.method == "attention" else cfg.prune.steps
        out = layout.finetune_dir(rounds)
        last_dir = layout.pruned_model
    else:
        out, last_dir = layout.stage_dir("train"), layout.trained_model
    if checkpoint == "last":
        return {"checkpoint": "last", "pruned": pruned, "trainable_dir": str(last_dir),
                "record": _last_record(out)}
    best = out / BEST_SUBDIR
    if not (best / BEST_RECORD).is_file():
        if pruned and cfg.prune.finetune_steps == 0:
            why = ("this pruned run was not fine-tuned (prune.finetune_steps=0), so it has "
                   "no validation rounds after pruning")
        else:
            why = ("the run was trained before best checkpoints were kept, or its training "
                   "did not finish a validation round")
        raise FileNotFoundError(
            f"no best checkpoint at {best / BEST_RECORD}: {why}. Export the last weights "
            "(`--checkpoint last` / export.checkpoint=last), or train again to keep the best "
            f"round (delete {layout.manifest_path('prune' if pruned else 'train')} and rerun)")
    return {"checkpoint": "best", "pruned": pruned, "trainable_dir": str(best),
            "record": read_json(best / BEST_RECORD)}


def final_context(cfg: Config, kg: KnowledgeGraph, checkpoint: str = "last") -> ModelContext:
    """The run's final model (LoRA not merged) at ``checkpoint`` (see
    :func:`final_checkpoint`): the pruned one when pruning is configured and done, else the
    trained one."""
    chosen = final_checkpoint(cfg, checkpoint)
    trainable = Path(chosen["trainable_dir"])
    if chosen["pruned"]:
        return load_pruned_context(cfg, kg, trainable_dir=trainable)
    return load_trained_context(cfg, kg, model_dir=trainable)


def prepare_finetune(model: ELMM, cfg: Config) -> None:
    """Fresh LoRA adapters on a pruned, merged LLM (or the whole LLM trains), plus the heads
    and every compensation map."""
    if lora_layers(model):
        raise ValueError("merge the previous adapters before adding new ones")
    if hasattr(model, "peft_config"):  # left behind by merged adapters
        del model.peft_config
    if cfg.lora.enabled:
        apply_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                   target_regex=cfg.lora.target_regex)
    else:
        set_trainable(model, train_llm=True)
    for module in model.modules():
        if isinstance(module, LinearCompensation):
            for parameter in module.parameters():
                parameter.requires_grad_(True)


def set_visual_summaries(model: ELMM, features, chunk: int = 256) -> None:
    """Give the entity table's image pathway every entity's pooled features."""
    for start in range(0, model.num_entities, chunk):
        ids = torch.arange(start, min(start + chunk, model.num_entities))
        feats, mask = features.features_for(ids)
        model.entity_table.set_visual_summary(feats, mask, start)

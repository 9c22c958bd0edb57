"""Export a trained run as a self-contained model directory, load it, and predict.

Layout of an export::

    elmm_export.json      format version, sizes, what is inside
    config.yaml           the resolved config (model.backbone -> ./backbone, LoRA merged)
    backbone/             the Llava backbone with LoRA merged (save_pretrained, safetensors)
    elmm.safetensors      MVTC, readout, learned tokens, entity table (+ image adapter) and
                          the final entity vectors used for scoring
    features.safetensors  per-entity image features (when under the size limit; otherwise
                          elmm_export.json names the feature store to read)
    tokenizer/            the tokenizer
    entities.tsv, relations.tsv   id, name / text (the vocabularies)
    adapter/              the LoRA adapter in PEFT format (unmerged; :mod:`.adapter`)
    README.md             the model card (:mod:`.card`)
    metrics_<split>.json  the filtered ranking of the exported weights (when given)

Loading uses safetensors and ``from_pretrained`` only: no pickle.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from elmm_ray.config import Config, dump_config, load_config
from elmm_ray.data.collate import QueryCollator
from elmm_ray.data.feature_store import FeatureStore
from elmm_ray.data.image_features import FeatureBank
from elmm_ray.data.kg import KnowledgeGraph
from elmm_ray.eval.evaluate import refresh_entity_cache
from elmm_ray.eval.report import write_metrics_json
from elmm_ray.export.adapter import save_peft_adapter
from elmm_ray.export.card import CardFacts, write_card
from elmm_ray.faults import fault_point
from elmm_ray.integrity import read_json_checked, record_checksums, verify_checksums
from elmm_ray.layout import RunLayout
from elmm_ray.models.backbone import resolve_dtype
from elmm_ray.models.build import TINY, build_elmm
from elmm_ray.models.elmm import ELMM
from elmm_ray.models.lora import lora_layers, merge_lora
from elmm_ray.models.pruned import (
    MODEL_BACKBONE_SUBDIR,
    is_pruned,
    load_any_backbone,
    save_pruned_backbone,
)
from elmm_ray.models.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

EXPORT_FORMAT = 1
MARKER = "elmm_export.json"
MAX_EMBEDDED_FEATURE_BYTES = 2 * 1024**3


def is_export(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def _module_state(model: ELMM) -> dict[str, torch.Tensor]:
    """Everything of the ELMM outside the backbone, by full parameter name."""
    state = {}
    for name, module in model.always_trainable().items():
        if name == "projector":  # part of the backbone's own weights
            continue
        for key, value in module.state_dict().items():
            state[f"{name}.{key}"] = value.detach().contiguous().cpu()
    return state


def base_model_source(cfg: Config, pruned: bool) -> dict:
    """The unmerged backbone the run's LoRA adapters were trained on: ``kind`` (``tiny``:
    random-init from the config's seed, saved once in the run; ``composed``: the
    ``model.vision_tower`` joined to the LLM, saved once in the run; ``pruned``: the run's
    pruned backbone; ``checkpoint``: a hub id or folder) and ``path``."""
    layout = RunLayout.of(cfg)
    if pruned:
        return {"kind": "pruned",
                "path": str(layout.pruned_model / MODEL_BACKBONE_SUBDIR)}
    if cfg.model.vision_tower:  # the tower joined to the LLM, saved once in the run
        return {"kind": "composed", "path": str(layout.backbone)}
    if cfg.model.backbone == TINY:
        return {"kind": "tiny", "path": str(layout.backbone), "seed": cfg.seed}
    return {"kind": "checkpoint", "path": cfg.model.backbone}


def visual_tokens_per_query(cfg: Config, features) -> int:
    """LLM input tokens of a query that carry the head entity's images."""
    if cfg.model.uncompressed:
        return cfg.images.max_images_per_entity * int(features.feature_shape[0])
    return cfg.mvtc.n_visual + cfg.mvtc.n_text


def export_model(model: ELMM, tokenizer, collator: QueryCollator, features,
                 kg: KnowledgeGraph, cfg: Config, out_dir: str | Path, *,
                 metrics: dict | None = None, checkpoint: dict | None = None) -> Path:
    """Write ``model`` (LoRA is merged here, in place) as a self-contained directory, with
    its unmerged LoRA adapter in PEFT format and a model card. ``metrics``: the filtered
    ranking of these weights (for the card); ``checkpoint``: which weights they are
    (:func:`elmm_ray.train.context.final_checkpoint`)."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    pruned = checkpoint["pruned"] if checkpoint else is_pruned(model)
    base = base_model_source(cfg, pruned)
    adapter = (save_peft_adapter(model, out / "adapter", base["path"])
               if lora_layers(model) else None)
    merged = merge_lora(model)
    model.eval()
    if is_pruned(model):  # per-layer shapes differ from config.json: save them with the weights
        save_pruned_backbone(model, out / "backbone")
    else:
        model.backbone.save_pretrained(out / "backbone")
    tokenizer.save_pretrained(out / "tokenizer")
    state = _module_state(model)
    refresh_entity_cache(model, collator, features, cfg.eval.batch_size)  # the final encoding
    with torch.no_grad():
        state["entity_vectors"] = model.entity_vectors().float().cpu().contiguous()
    save_file(state, str(out / "elmm.safetensors"))

    feature_bytes = kg.num_entities * int(np.prod(features.feature_shape)) * 2 * max(
        cfg.images.max_images_per_entity, 1)
    embedded = feature_bytes <= MAX_EMBEDDED_FEATURE_BYTES
    if embedded:
        ids = torch.arange(kg.num_entities)
        feats, mask = features.features_for(ids)
        save_file({"features": feats.half().contiguous(), "mask": mask.contiguous()},
                  str(out / "features.safetensors"))
    exported_cfg = dataclasses.replace(
        cfg, run_dir=cfg.run_dir if "://" in cfg.run_dir else str(Path(cfg.run_dir).resolve()),
        storage_endpoint=None,
        dataset=dataclasses.replace(cfg.dataset, path=str(RunLayout.of(cfg).dataset_dir)),
        model=dataclasses.replace(cfg.model, backbone="backbone"),
        lora=dataclasses.replace(cfg.lora, enabled=False),
        # where the run logged and checkpointed (a URI may hold credentials): not shipped
        tracking=type(cfg.tracking)(),
        train=dataclasses.replace(cfg.train, storage_path=None))
    dump_config(exported_cfg, out / "config.yaml")
    (out / "entities.tsv").write_text("".join(
        f"{e}\t{kg.entity_names[i]}\t{kg.entity_text(i)}\n" for i, e in enumerate(kg.entities)))
    (out / "relations.tsv").write_text("".join(
        f"{r}\t{kg.relation_texts[i]}\n" for i, r in enumerate(kg.relations)))
    meta = {"format": EXPORT_FORMAT, "dataset": kg.name, "num_entities": kg.num_entities,
            "num_relations": kg.num_relations, "embed_dim": model.embed_dim,
            "temperature": model.temperature, "lora_layers_merged": merged,
            "features": "features.safetensors" if embedded else None,
            "feature_store": None if embedded else getattr(features, "path", None),
            "max_images_per_entity": cfg.images.max_images_per_entity,
            "parameters": sum(p.numel() for p in model.parameters()),
            "checkpoint": checkpoint, "base_model": base, "adapter": adapter,
            "visual_tokens_per_query": visual_tokens_per_query(cfg, features),
            "metrics": f"metrics_{metrics['split']}.json" if metrics else None}
    if metrics:
        write_metrics_json(metrics, out / meta["metrics"])
    head, relation, _ = kg.triples["test"][0] if len(kg.triples["test"]) else kg.triples[
        "train"][0]
    write_card(CardFacts(
        name=f"{kg.name}-{Path(cfg.run_dir).name}", cfg=cfg, stats=kg.stats(), metrics=metrics,
        checkpoint=checkpoint, adapter=adapter, base=base,
        visual_tokens=meta["visual_tokens_per_query"], parameters=meta["parameters"],
        example=(kg.entities[head], kg.relation_texts[relation])), out)
    record_checksums(out)  # every file's digest, checked by load_export
    fault_point("export.write")
    (out / MARKER).write_text(json.dumps(meta, indent=2) + "\n")  # last: marks it complete
    return out


def load_base_backbone(path: str | Path):
    """The unmerged backbone an export's ``adapter/`` loads onto (``PeftModel.from_pretrained
    (load_base_backbone(path), path / "adapter")``): the hub checkpoint (embeddings resized
    to the export's tokenizer), the run's pruned backbone, or the tiny random-init backbone,
    read from the run when its folder is still there and rebuilt from ``config.yaml`` and
    its seed otherwise."""
    path = Path(path)
    meta = _read_meta(path)
    base = meta.get("base_model")
    if not base:
        raise ValueError(f"{path / MARKER} names no base model (an export older than "
                         "adapters); export the run again")
    cfg = load_config(path / "config.yaml", [f"model.backbone={base['path']}"])
    dtype = resolve_dtype(cfg.model.dtype)
    if base["kind"] == "tiny" and not (Path(base["path"]) / "config.json").is_file():
        tiny = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone=TINY))
        return build_elmm(tiny, num_entities=meta["num_entities"],
                          tokenizer=load_tokenizer(path / "tokenizer")).backbone
    if base["kind"] in ("pruned", "composed") and not Path(base["path"]).is_dir():
        raise FileNotFoundError(f"the {base['kind']} base backbone {base['path']} is gone (it "
                                "lives in the run directory); export from the run again")
    backbone = load_any_backbone(base["path"], dtype)
    tokens = len(load_tokenizer(path / "tokenizer"))
    if tokens > backbone.get_input_embeddings().num_embeddings:
        backbone.resize_token_embeddings(tokens)
    return backbone


@dataclass
class ExportedModel:
    """A loaded export: everything needed to encode queries and score all entities."""

    model: ELMM
    collator: QueryCollator
    features: object
    entities: list[str]
    entity_names: list[str]
    relations: list[str]
    relation_texts: list[str]
    entity_vectors: torch.Tensor
    config: Config
    meta: dict

    def entity_id(self, name_or_id: str) -> int:
        """An entity by its dataset id or its name (case-insensitive, must be unique)."""
        if name_or_id in self._entity_index:
            return self._entity_index[name_or_id]
        matches = [i for i, n in enumerate(self.entity_names) if n.lower() == name_or_id.lower()]
        if len(matches) == 1:
            return matches[0]
        if matches:
            ids = ", ".join(self.entities[i] for i in matches[:5])
            raise KeyError(f"entity name {name_or_id!r} is ambiguous ({ids}); give the id")
        raise KeyError(f"unknown entity {name_or_id!r} (neither an id nor a name of the "
                       f"{len(self.entities)} entities)")

    def relation_id(self, name_or_text: str) -> int:
        for i, (r, text) in enumerate(zip(self.relations, self.relation_texts)):
            if name_or_text in (r, text):
                return i
        shown = ", ".join(self.relations[:10]) + (" ..." if len(self.relations) > 10 else "")
        raise KeyError(f"unknown relation {name_or_text!r}; known: {shown}")

    @property
    def _entity_index(self) -> dict[str, int]:
        if not hasattr(self, "_index"):
            self._index = {e: i for i, e in enumerate(self.entities)}
        return self._index

    @torch.no_grad()
    def predict(self, heads: list[int], relations: list[int], *, inverse: bool = False,
                k: int = 10) -> list[list[tuple[int, float]]]:
        """Top-``k`` answers of ``(head, relation, ?)`` (or ``(?, relation, head)`` with
        ``inverse``), as (entity id, score) pairs."""
        entities = torch.tensor(heads, dtype=torch.long)
        qrels = torch.tensor(relations, dtype=torch.long) + (len(self.relations) if inverse
                                                             else 0)
        feats, mask = self.features.features_for(entities)
        batch = self.collator(entities, qrels, feats, mask)
        queries = self.model.encode_queries(batch).float()
        scores = queries @ self.entity_vectors.T / self.model.temperature
        top = scores.topk(min(k, scores.shape[1]), dim=1)
        return [list(zip(i.tolist(), s.tolist())) for i, s in zip(top.indices, top.values)]


def _read_meta(path: Path) -> dict:
    if not is_export(path):
        raise FileNotFoundError(f"{path} is not an elmm_ray export (missing {MARKER}); "
                                "write one with `elmm-ray export RUN_DIR`")
    meta = read_json_checked(path / MARKER, "rerun `elmm-ray export` for its run")
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: export format {meta.get('format')} is not supported "
                         f"(this version reads format {EXPORT_FORMAT})")
    return meta


def _read_tsv(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


def load_export(path: str | Path) -> ExportedModel:
    """Load an export directory written by :func:`export_model`."""
    path = Path(path)
    meta = _read_meta(path)
    verify_checksums(path, f"the export {path} cannot be trusted: rerun `elmm-ray export` "
                     "for its run (the bad file is moved aside, so the export stage is no "
                     "longer complete)", quarantine_bad=True)
    cfg = load_config(path / "config.yaml", [f"model.backbone={path / 'backbone'}"])
    tokenizer = load_tokenizer(path / "tokenizer")
    entity_rows, relation_rows = _read_tsv(path / "entities.tsv"), _read_tsv(path / "relations.tsv")
    entities, names, prompts = (list(col) for col in zip(*entity_rows))
    relations, texts = (list(col) for col in zip(*relation_rows))
    if meta.get("features"):
        blob = load_file(str(path / meta["features"]))
        features = FeatureBank(blob["features"], blob["mask"])
    else:
        features = FeatureStore.open(meta["feature_store"])
    model = build_elmm(cfg, num_entities=len(entities), tokenizer=tokenizer,
                       feature_width=int(features.feature_shape[1]))
    state = load_file(str(path / "elmm.safetensors"))
    entity_vectors = state.pop("entity_vectors")
    modules = model.always_trainable()
    for name, module in modules.items():
        if name == "projector":
            continue
        prefix = f"{name}."
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = module.load_state_dict(part, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}/elmm.safetensors does not fit the model's {name}: "
                             f"missing {missing}, unexpected {unexpected}")
    model.entity_table.set_visual_summary(*features.features_for(torch.arange(len(entities))))
    collator = QueryCollator(tokenizer, prompts, texts, len(relations), cfg.model.max_text_tokens)
    model.eval()
    return ExportedModel(model, collator, features, entities, names, relations, texts,
                         entity_vectors, cfg, meta)


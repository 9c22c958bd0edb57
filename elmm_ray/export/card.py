"""The model card (``README.md``) of an export, in the shape of a Hugging Face model card:
YAML front matter (library, base model, tags, dataset, license, ``model-index`` with the
evaluation metrics), then what the model is, its data, key settings, metrics, visual
tokens per query and how to load it and predict."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from elmm_ray.config import Config

CARD_FILE = "README.md"
TAGS = ["elmm_ray", "multimodal-knowledge-graph-completion", "link-prediction", "llava",
        "lora", "peft"]


@dataclass(frozen=True)
class CardFacts:
    """What the card says, gathered by the exporter."""

    name: str
    cfg: Config  # the run's config (original backbone, LoRA on)
    stats: dict  # KnowledgeGraph.stats()
    metrics: dict | None  # filtered ranking of the exported weights (eval.split)
    checkpoint: dict | None  # final_checkpoint(): best/last, pruned, validation record
    adapter: dict | None  # save_peft_adapter()'s summary; None without LoRA
    base: dict  # where the unmerged base backbone comes from (kind, path)
    visual_tokens: int  # LLM input tokens per query carrying image content
    parameters: int
    example: tuple[str, str]  # (head entity id, relation text) of a real triple


def _metric_rows(metrics: dict) -> list[tuple[str, dict]]:
    return [(subset, metrics[subset]) for subset in ("overall", "tail", "head")
            if subset in metrics]


def _number(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) \
        else float(value)


def front_matter(facts: CardFacts) -> dict:
    """The YAML header: Hub metadata plus ``model-index`` with the overall metrics."""
    cfg = facts.cfg
    meta: dict = {"library_name": "peft" if facts.adapter else "elmm_ray",
                  "base_model": facts.base["path"], "tags": list(TAGS),
                  "datasets": [cfg.dataset.name], "license": cfg.export.license,
                  "pipeline_tag": "feature-extraction"}
    if facts.metrics:
        overall = facts.metrics["overall"]
        split = facts.metrics["split"]
        values = [{"type": "mrr", "name": f"MRR (filtered, {split})",
                   "value": _number(overall.get("mrr"))}]
        values += [{"type": f"hits@{k}", "name": f"Hits@{k} (filtered, {split})",
                    "value": _number(overall.get(f"hits@{k}"))} for k in cfg.eval.hits_at]
        meta["model-index"] = [{"name": facts.name, "results": [{
            "task": {"type": "link-prediction",
                     "name": "Multimodal knowledge-graph completion"},
            "dataset": {"name": cfg.dataset.name, "type": cfg.dataset.name, "split": split},
            "metrics": values}]}]
    return meta


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    cells = [[c.replace("|", "\\|") for c in row] for row in rows]  # a literal | in a cell
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])


def _cell(value, digits: int = 4) -> str:
    value = _number(value)
    return "-" if value is None else f"{value:.{digits}f}"


def _checkpoint_text(checkpoint: dict | None) -> str:
    if not checkpoint:
        return "the weights given to the exporter"
    record = checkpoint.get("record") or {}
    where = "after pruning and fine-tuning" if checkpoint["pruned"] else "of training"
    what = ("the validation round with the highest validation MRR"
            if checkpoint["checkpoint"] == "best" else "the last step")
    if record:
        what += (f" (step {record['step']}, epoch {record.get('epoch', '-')}, validation MRR "
                 f"{_cell(record.get('val_mrr'))})")
    return f"`{checkpoint['checkpoint']}`: {what} {where}"


def _settings_rows(facts: CardFacts) -> list[list[str]]:
    cfg = facts.cfg
    lora = (f"r={cfg.lora.r}, alpha={cfg.lora.alpha}, dropout={cfg.lora.dropout}, "
            f"targets `{cfg.lora.target_regex}`" if cfg.lora.enabled
            else "off (the LLM trained in full)")
    mvtc = ("off: all patch tokens go to the LLM" if cfg.model.uncompressed else
            f"n_visual={cfg.mvtc.n_visual}, n_text={cfg.mvtc.n_text}, heads={cfg.mvtc.heads}")
    prune = ("none" if cfg.prune.method == "none" else
             f"{cfg.prune.method}, ratio {cfg.prune.ratio}, {cfg.prune.steps} round(s), "
             f"{cfg.prune.finetune_steps} fine-tuning steps each")
    return [["backbone", f"`{cfg.model.backbone}` (preset `{cfg.model.preset}`, "
             f"dtype {cfg.model.dtype})"],
            ["parameters", f"{facts.parameters:,}"],
            ["LoRA", lora], ["MVTC", mvtc], ["pruning", prune],
            ["entity vectors", f"`{cfg.model.entity_repr}`"],
            ["images per entity", str(cfg.images.max_images_per_entity)],
            ["training", f"{cfg.train.epochs} epoch(s), global batch "
             f"{cfg.train.global_batch_size}, "
             f"lr {cfg.train.learning_rate}, {cfg.train.num_negatives} sampled negatives, "
             f"seed {cfg.train.seed}"]]


def _how_to_load(facts: CardFacts) -> str:
    head, relation = facts.example
    parts = [
        "With elmm_ray installed (`pip install -e .` in its repository), from the folder "
        "holding this card:",
        "```bash",
        f"elmm-ray predict . --head {head!r} --relation {relation!r} --k 10",
        "elmm-ray eval .   # filtered ranking on the dataset named in config.yaml",
        "```",
        "```python",
        "from elmm_ray.export import load_export",
        "",
        'exported = load_export(".")',
        f"head = exported.entity_id({head!r})",
        f"relation = exported.relation_id({relation!r})",
        "for entity, score in exported.predict([head], [relation], k=10)[0]:",
        "    print(exported.entities[entity], exported.entity_names[entity], score)",
        "```",
    ]
    if facts.adapter:
        base = facts.base
        saved = ", ".join(facts.adapter["modules_to_save"]) or "none"
        if base["kind"] == "tiny":
            origin = (f"a tiny random-init Llava built from `config.yaml` with seed "
                      f"{facts.cfg.seed}; the run saved it at `{base['path']}`, and "
                      "`load_base_backbone` rebuilds the same weights when that folder is gone")
        elif base["kind"] == "pruned":
            origin = (f"the pruned backbone (LoRA of the earlier rounds merged, then pruned) "
                      f"saved by the run at `{base['path']}`; load it with "
                      "`elmm_ray.models.pruned.load_pruned_backbone`")
        else:
            origin = (f"`{base['path']}` (its embedding matrix resized to the tokenizer in "
                      "`tokenizer/` when tokens were added)")
        parts += [
            "",
            f"The LoRA adapter in PEFT format (`adapter/`, r={facts.adapter['r']}, "
            f"alpha={facts.adapter['alpha']}, {facts.adapter['target_modules']} target "
            f"modules; modules saved in full: {saved}) "
            f"loads onto the unmerged base backbone: {origin}.",
            "```python",
            "from peft import PeftModel",
            "from elmm_ray.export import load_base_backbone",
            "",
            'base = load_base_backbone(".")  # the backbone the run started from',
            'model = PeftModel.from_pretrained(base, "adapter")',
            "```",
            "MVTC, the readout, the learned `<readout>`/`<inv>` embeddings and the entity "
            "table are not PEFT modules: they are in `elmm.safetensors` (with the final "
            "entity vectors), which `load_export` reads; `backbone/` holds the backbone with "
            "the adapter merged.",
        ]
    else:
        parts += ["", "LoRA was off in this run: there is no `adapter/`; `backbone/` holds "
                  "the trained backbone."]
    return "\n".join(parts)


def render_card(facts: CardFacts) -> str:
    """The card's text."""
    cfg, stats = facts.cfg, facts.stats
    header = yaml.safe_dump(front_matter(facts), sort_keys=False, allow_unicode=True)
    data_rows = [["entities", f"{stats['entities']:,}"], ["relations", f"{stats['relations']:,}"]]
    data_rows += [[f"triples: {split}", f"{n:,}"] for split, n in stats["triples"].items()]
    data_rows += [["entities with images", f"{stats['entities_with_images']:,}"]]
    sections = [
        f"---\n{header}---",
        f"# {facts.name}",
        "An [ELMM](https://arxiv.org/abs/2510.16753) model for multimodal knowledge-graph "
        "completion trained with elmm_ray: a Llava backbone with LoRA reads a query's head "
        "entity text, its images compressed by the multi-view visual token compressor "
        "(MVTC) and the relation; the `<readout>` token's state is scored against every "
        "entity's vector.",
        f"Weights: {_checkpoint_text(facts.checkpoint)}.",
        f"## Data\n\nDataset `{cfg.dataset.name}`"
        + (f" ({stats['name']})" if stats["name"] != cfg.dataset.name else "") + ":\n\n"
        + _table(["", "count"], data_rows),
        "## Settings\n\n" + _table(["", "value"], _settings_rows(facts)),
        f"Visual tokens per query: **{facts.visual_tokens}** LLM input tokens carry the "
        "head entity's images"
        + (" (all patch tokens, uncompressed)." if cfg.model.uncompressed else
           f" (MVTC: {cfg.mvtc.n_visual} visual + {cfg.mvtc.n_text} text-guided, from up to "
           f"{cfg.images.max_images_per_entity} images)."),
    ]
    if facts.metrics:
        hits = list(cfg.eval.hits_at)
        rows = [[subset, f"{row.get('count', '-')}", _cell(row.get("mrr")),
                 _cell(row.get("mr"), 1), *[_cell(row.get(f"hits@{k}")) for k in hits]]
                for subset, row in _metric_rows(facts.metrics)]
        sections.append(
            f"## Evaluation\n\nFiltered ranking against all {stats['entities']:,} entities on "
            f"the `{facts.metrics['split']}` split ({facts.metrics['num_queries']:,} queries; "
            "tail = `(h, r, ?)`, head = `(?, r, t)`), weights "
            f"{_checkpoint_text(facts.checkpoint)}:\n\n"
            + _table(["subset", "queries", "MRR", "MR", *[f"Hits@{k}" for k in hits]], rows))
    else:
        sections.append("## Evaluation\n\nNot evaluated at export.")
    sections.append("## How to load and predict\n\n" + _how_to_load(facts))
    sections.append("## Files\n\n" + _table(["file", "what"], [
        ["`elmm_export.json`", "format version, sizes, checkpoint, adapter, base model"],
        ["`config.yaml`", "the run's resolved config (backbone -> `backbone/`, LoRA merged)"],
        ["`backbone/`", "the Llava backbone with LoRA merged (safetensors)"],
        ["`adapter/`", "the LoRA adapter in PEFT format (unmerged)"],
        ["`elmm.safetensors`", "MVTC, readout, learned tokens, entity table, entity vectors"],
        ["`features.safetensors`", "per-entity image features (or a feature store named in "
         "`elmm_export.json`)"],
        ["`tokenizer/`, `entities.tsv`, `relations.tsv`", "tokenizer and vocabularies"],
        ["`metrics_<split>.json`", "the evaluation above, in full"]]))
    return "\n\n".join(sections) + "\n"


def write_card(facts: CardFacts, out_dir: str | Path) -> Path:
    path = Path(out_dir) / CARD_FILE
    path.write_text(render_card(facts), encoding="utf-8")
    return path


def read_front_matter(path: str | Path) -> dict:
    """The YAML front matter of a model card (between the first two ``---`` lines)."""
    text = Path(path).read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        raise ValueError(f"{path}: a model card starts with a '---' line of YAML front matter")
    end = text.find("\n---\n", 4)
    if end < 0:
        raise ValueError(f"{path}: the front matter has no closing '---' line")
    return yaml.safe_load(text[4:end + 1])

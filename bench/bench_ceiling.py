"""What the tiny setting can reach on the synthetic KG: filtered Hits@1 ceilings per
direction and attribute, computed from the data and from the frozen vision tower.

- ``oracle``: a ranker that knows every entity's hidden attributes (ties broken at random:
  expected Hits@1). The filtered ranking removes every known answer (all splits), so the
  only entities an oracle cannot tell from the answer are unfiltered ones with the same
  attribute value; on the synthetic KG there are none, so the oracle ceiling is 1.0.
- ``linear reader``: per attribute relation, a softmax regression from an entity's
  mean-pooled patch features (``model.vision_tower``, else the random tiny tower of
  ``model.*``; layer ``model.vision_feature_layer``) to its value,
  trained on the **train** attribute triples only, then used as the ranker of the test
  queries (tail: the most probable value; head: the object with the highest probability of
  the asked value among the unfiltered objects). It shows what the frozen features expose to
  a simple reader: colour and pattern are readable, shape and count barely.

    python bench/bench_ceiling.py [--entities 300,1000] [--name NAME] [k=v ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, save  # noqa: E402

from elmm_ray.config import load_config  # noqa: E402
from elmm_ray.data.dataset import load_dataset  # noqa: E402
from elmm_ray.data.image_features import features_from_shards  # noqa: E402
from elmm_ray.data.shards import pack_images  # noqa: E402
from elmm_ray.data.synth import TRUTH_NAME  # noqa: E402
from elmm_ray.layout import absolute_paths  # noqa: E402
from elmm_ray.models.backbone import build_tiny_llava, vision_tower_of  # noqa: E402
from elmm_ray.models.towers import load_tower, pixel_spec  # noqa: E402
from elmm_ray.stages import run_stage  # noqa: E402
from elmm_ray.tables import format_table  # noqa: E402

DEMO = str(REPO_ROOT / "configs" / "demo.yaml")


def attribute_value(entity: dict, attribute: str) -> str | None:
    """The entity's value of ``attribute`` (an object's hidden one, a value entity's own)."""
    if entity["kind"] == "object":
        return entity["attributes"][attribute]
    return entity["value"] if entity["attribute"] == attribute else None


def pooled_features(cfg, kg, shard_dir: Path) -> torch.Tensor:
    """Mean of every entity's patch features over its images (zeros without images), from
    ``model.vision_tower`` when set, else the random tiny tower of ``model.*``."""
    m = cfg.model
    if m.vision_tower:
        tower, pixels = load_tower(m.vision_tower), pixel_spec(m.vision_tower)
    else:
        tower, pixels = vision_tower_of(build_tiny_llava(
            vision_hidden=m.vision_hidden, vision_layers=m.vision_layers,
            vision_heads=m.vision_heads, image_size=m.image_size, patch_size=m.patch_size,
            llm_hidden=32, llm_layers=1, llm_heads=4, llm_kv_heads=2, llm_intermediate=64,
            vocab_size=64, image_token_id=4, pad_token_id=0, seed=cfg.seed)), None
    bank = features_from_shards(tower, shard_dir, num_entities=kg.num_entities,
                                max_images=cfg.images.max_images_per_entity,
                                image_size=m.image_size, layer=m.vision_feature_layer,
                                pool=m.feature_pool, pixels=pixels)
    feats, mask = bank.features_for(torch.arange(kg.num_entities))
    tokens = mask[:, :, None].expand(-1, -1, feats.shape[2]).flatten(1)
    flat = feats.float().flatten(1, 2)
    return (flat * tokens[..., None]).sum(1) / tokens.sum(1, keepdim=True).clamp(min=1)


def fit_reader(x: torch.Tensor, labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """Log-probabilities ``(E, classes)`` of an L2-regularised softmax regression fitted on
    the rows ``x[labels[:, 0]]`` -> ``labels[:, 1]``."""
    torch.manual_seed(0)
    xs = x[labels[:, 0]]
    y = torch.tensor([classes.index(v) for v in labels[:, 1]])
    mean, std = xs.mean(0), xs.std(0) + 1e-6
    weight = torch.zeros(x.shape[1], len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(500):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy((xs - mean) / std @ weight + bias, y)
        (loss + 1e-3 * (weight**2).sum()).backward()
        optimizer.step()
    with torch.no_grad():
        return torch.log_softmax((x - mean) / std @ weight + bias, dim=1).numpy()


def ceilings(kg, truth: dict, x: torch.Tensor) -> dict:
    """Expected oracle Hits@1 and the linear reader's Hits@1 per direction and attribute."""
    entities = [truth["entities"][e] for e in kg.entities]
    relations = [truth["relations"][r] for r in kg.relations]
    is_object = np.array([e["kind"] == "object" for e in entities])
    train, R = kg.triples["train"], kg.num_relations
    readers = {}
    for r, rel in enumerate(relations):
        if rel["kind"] == "attribute":
            rows = train[train[:, 1] == r][:, [0, 2]]
            classes = sorted(set(rows[:, 1].tolist()))
            readers[r] = (classes, fit_reader(x, rows, classes))
    filters = kg.filter_index()
    queries = kg.queries("test")
    n = len(kg.triples["test"])
    out: dict = {}
    for direction, block in (("tail", queries[:n]), ("head", queries[n:])):
        oracle: dict[str, list[float]] = {}
        reader: dict[str, list[float]] = {}
        for entity, qrel, answer in block:
            r = int(qrel) % R
            attribute = relations[r]["attribute"]
            known = set(filters.answers_of(int(entity), int(qrel)).tolist()) - {int(answer)}
            target = entities[answer]
            value = attribute_value(target, attribute)
            same = [c for c in range(kg.num_entities) if c != answer and c not in known
                    and entities[c]["kind"] == target["kind"]
                    and attribute_value(entities[c], attribute) == value]
            oracle.setdefault(attribute, []).append(1.0 / (1 + len(same)))
            if r not in readers:
                continue
            classes, logp = readers[r]
            if direction == "tail":
                allowed = [i for i, v in enumerate(classes) if v not in known]
                hit = classes[max(allowed, key=lambda i: logp[entity, i])] == answer
            else:
                column = classes.index(int(entity))
                rivals = [c for c in np.nonzero(is_object)[0] if c not in known and c != answer]
                hit = bool(logp[answer, column] > logp[rivals, column].max())
            reader.setdefault(attribute, []).append(float(hit))
        out[direction] = {
            "oracle": float(np.mean([v for vs in oracle.values() for v in vs])),
            "reader": float(np.mean([v for vs in reader.values() for v in vs])),
            "reader_by_attribute": {a: float(np.mean(v)) for a, v in reader.items()},
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entities", default="300,1000", help="KG sizes, comma-separated")
    parser.add_argument("--name", default="ceiling", help="results/<name>.json")
    parser.add_argument("overrides", nargs="*", help="key=value on configs/demo.yaml")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for entities in [int(e) for e in args.entities.split(",") if e]:
        with tempfile.TemporaryDirectory(prefix="bench_ceiling_") as tmp:
            cfg = absolute_paths(load_config(DEMO, [
                f"run_dir={tmp}", f"dataset.synth.num_entities={entities}", *args.overrides]))
            run_stage("synth", cfg, show_progress=False)
            kg = load_dataset(cfg)
            shards = Path(tmp) / "shards"
            pack_images(kg, shards, use_ray=False, show_progress=False)
            data_dir = Path(tmp) / "data"
            truth = json.loads((data_dir / TRUTH_NAME).read_text())
            results[entities] = ceilings(kg, truth, pooled_features(cfg, kg, shards))
    rows = []
    for entities, r in results.items():
        for direction in ("tail", "head"):
            d = r[direction]
            rows.append((entities, direction, f"{d['oracle']:.3f}", f"{d['reader']:.3f}",
                         *(f"{d['reader_by_attribute'].get(a, float('nan')):.3f}"
                           for a in ("colour", "shape", "count", "pattern"))))
    print(format_table(rows, ["entities", "direction", "oracle", "linear reader", "colour",
                              "shape", "count", "pattern"],
                       title="test Hits@1 ceilings (filtered): attribute oracle and a linear "
                             "reader of the frozen tower's pooled features"))
    save(args.name, {"command": "python bench/bench_ceiling.py " + " ".join(sys.argv[1:]),
                     "args": vars(args), "results": results})


if __name__ == "__main__":
    main()

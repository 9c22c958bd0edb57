"""Where a trained model loses what its features carry (issue 22, item 4): a linear probe
per hidden attribute of the synthetic KG's objects at each stage of the entity encoding of
a trained run: the stored patch features (mean over tokens and images), the MVTC output
(mean over its tokens), the projector output (same) and the readout vector.

    python bench/bench_stage_probe.py RUN_DIR [--name NAME]

RUN_DIR: a trained run of `elmm-ray run configs/demo.yaml` (its config.yaml, data, features
and train/model). Probe: `elmm_ray.models.tower_pretrain.probe_accuracy` (70 % fit, 30 %
scored, one seed).

A second table shows whether the head queries of each attribute relation are fitted at all:
for each value ``v`` the query ``(?, has attribute, v)`` ranks every object (unfiltered) and
the table gives the median rank of the objects with value ``v`` whose triple is in train (a
fitted query ranks them first: median ~ half their number) and of those whose triple is held
out (dev or test: generalisation). Chance is about half the number of objects.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

from elmm_ray.config import load_config  # noqa: E402
from elmm_ray.data.dataset import load_dataset  # noqa: E402
from elmm_ray.data.synth import TRUTH_NAME  # noqa: E402
from elmm_ray.layout import RunLayout  # noqa: E402
from elmm_ray.models.tower_pretrain import probe_accuracy  # noqa: E402
from elmm_ray.tables import format_table  # noqa: E402
from elmm_ray.train.context import load_trained_context  # noqa: E402

STAGES = ("features", "mvtc", "projector", "readout")


def stage_vectors(ctx, ids: torch.Tensor, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Per entity of ``ids``: the pooled vector at each of :data:`STAGES`."""
    model, captured = ctx.model.eval(), {}

    def keep(name):
        def hook(_module, _inputs, output):
            captured[name] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [model.mvtc.register_forward_hook(keep("mvtc")),
               model.projector.register_forward_hook(keep("projector"))]
    out: dict[str, list] = {s: [] for s in STAGES}
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            feats, mask = ctx.features.features_for(chunk)
            tokens = mask[:, :, None].expand(-1, -1, feats.shape[2]).flatten(1).float()
            flat = feats.float().flatten(1, 2)
            out["features"].append(((flat * tokens[..., None]).sum(1)
                                    / tokens.sum(1, keepdim=True).clamp(min=1)).numpy())
            out["readout"].append(model.encode_entities(
                ctx.collator.entity_batch(chunk, feats, mask)).float().numpy())
            out["mvtc"].append(captured["mvtc"].float().mean(1).numpy())
            out["projector"].append(captured["projector"].float().mean(1).numpy())
    for handle in handles:
        handle.remove()
    return {s: np.concatenate(v) for s, v in out.items()}


def head_query_ranks(ctx, kg, truth: dict, objects: list[int]) -> dict:
    """Per attribute relation and value: median rank among ``objects`` of the objects with
    that value, known in train and held out, under the head query ``(value, r^-1)``."""
    from elmm_ray.eval.evaluate import encode_queries, refresh_entity_cache

    model = ctx.model.eval()
    refresh_entity_cache(model, ctx.collator, ctx.features, 256)
    entity_vectors = model.entity_vectors().float()[objects]
    train = kg.triples["train"]
    out: dict = {}
    for relation, text in enumerate(kg.relation_texts):
        values = sorted({int(t) for t in train[train[:, 1] == relation, 2]}
                        & {i for i, e in enumerate(kg.entities) if truth[e].get("kind") == "value"})
        if not values:
            continue
        attribute = truth[kg.entities[values[0]]]["attribute"]
        known = {int(h) for h in train[train[:, 1] == relation, 0]}
        queries = np.array([[v, relation + kg.num_relations, 0] for v in values])
        with torch.no_grad():
            scores = encode_queries(model, ctx.collator, ctx.features, queries, 64) @ \
                entity_vectors.T
        rows = {}
        for value, row in zip(values, scores, strict=True):
            rank = {objects[j]: k + 1 for k, j in enumerate(torch.argsort(-row).tolist())}
            same = [o for o in objects if truth[kg.entities[o]]["attributes"][attribute]
                    == truth[kg.entities[value]]["value"]]
            rows[truth[kg.entities[value]]["value"]] = {
                "known": float(np.median([rank[o] for o in same if o in known])),
                "held_out": float(np.median([rank[o] for o in same if o not in known]))
                if any(o not in known for o in same) else None,
                "objects_with_value": len(same)}
        out[text] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--name", default="stage_probe")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(Path(args.run_dir) / "config.yaml")
    kg = load_dataset(cfg)
    truth = json.loads((RunLayout.of(cfg).dataset_dir / TRUTH_NAME).read_text())["entities"]
    objects = [i for i, e in enumerate(kg.entities)
               if truth[e].get("kind") == "object" and kg.entity_images[i]]
    ctx = load_trained_context(cfg, kg)
    vectors = stage_vectors(ctx, torch.tensor(objects))
    attributes = list(truth[kg.entities[objects[0]]]["attributes"])
    results = {stage: {a: probe_accuracy(x, [truth[kg.entities[i]]["attributes"][a]
                                             for i in objects]) for a in attributes}
               for stage, x in vectors.items()}
    rows = [(stage, *(f"{results[stage][a]:.3f}" for a in attributes)) for stage in STAGES]
    print(format_table(rows, ["stage", *attributes],
                       title=f"linear probe per attribute ({len(objects)} objects, 30 % "
                             "scored) along the entity encoding of the trained model"))
    ranks = head_query_ranks(ctx, kg, truth, objects)
    rows = [(text, value, r["objects_with_value"], f"{r['known']:.0f}",
             "-" if r["held_out"] is None else f"{r['held_out']:.0f}")
            for text, values in ranks.items() for value, r in values.items()]
    print(format_table(rows, ["relation", "value", "objects", "known: median rank",
                              "held out: median rank"],
                       title=f"head queries (?, relation, value): ranks among {len(objects)} "
                             "objects (unfiltered)"))
    save(args.name, {"command": "python bench/bench_stage_probe.py " + " ".join(sys.argv[1:]),
                     "objects": len(objects), "results": results, "head_query_ranks": ranks})


if __name__ == "__main__":
    main()

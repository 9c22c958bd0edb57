"""What a random-init tiny vision tower exposes: a linear probe from each object's pooled
patch features (mean over its images' tokens, layer -2) to its hidden colour and shape in
the synthetic KG, for several patch sizes. This is why `configs/demo.yaml` uses 4 px
patches: the probe's shape accuracy is near chance at 16 px.

    python bench/bench_vision_probe.py [--patches 16 8 4] [--entities 300]
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
from common import save  # noqa: E402

from elmm_ray.data.image_features import features_from_shards  # noqa: E402
from elmm_ray.data.kg import load_kg  # noqa: E402
from elmm_ray.data.shards import pack_images  # noqa: E402
from elmm_ray.data.synth import generate_synthetic_kg  # noqa: E402
from elmm_ray.models.backbone import build_tiny_llava, vision_tower_of  # noqa: E402
from elmm_ray.tables import format_table  # noqa: E402


def probe_accuracy(x: np.ndarray, labels: list[str], seed: int = 0) -> float:
    """Held-out accuracy (30%) of an L2-regularised softmax regression."""
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(v) for v in labels])
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[: int(0.7 * len(x))], order[int(0.7 * len(x)):]
    feats = torch.tensor(x, dtype=torch.float32)
    feats = (feats - feats[train].mean(0)) / (feats[train].std(0) + 1e-6)
    weight = torch.zeros(feats.shape[1], len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(500):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(feats[train] @ weight + bias, y[train])
        (loss + 1e-3 * (weight**2).sum()).backward()
        optimizer.step()
    predicted = (feats[test] @ weight + bias).argmax(1)
    return float((predicted == y[test]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patches", type=int, nargs="+", default=[16, 8, 4])
    parser.add_argument("--entities", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_probe_") as tmp:
        data = Path(tmp) / "data"
        generate_synthetic_kg(data, num_entities=args.entities, image_size=args.image_size)
        kg = load_kg(data)
        pack_images(kg, Path(tmp) / "shards", use_ray=False, show_progress=False)
        truth = json.loads((data / "synth_truth.json").read_text())["entities"]
        objects = [i for i, e in enumerate(kg.entities)
                   if truth[e].get("kind") == "object" and kg.entity_images[i]]
        for patch in args.patches:
            backbone = build_tiny_llava(
                vision_hidden=64, vision_layers=2, vision_heads=4, image_size=args.image_size,
                patch_size=patch, llm_hidden=32, llm_layers=1, llm_heads=4, llm_kv_heads=2,
                llm_intermediate=64, vocab_size=64, image_token_id=4, pad_token_id=0, seed=0)
            bank = features_from_shards(vision_tower_of(backbone), Path(tmp) / "shards",
                                        num_entities=kg.num_entities, max_images=4,
                                        image_size=args.image_size, layer=-2)
            feats, mask = bank.features_for(torch.tensor(objects))
            tokens = mask[:, :, None].expand(-1, -1, feats.shape[2]).flatten(1)
            pooled = (feats.flatten(1, 2) * tokens[..., None]).sum(1) / tokens.sum(1, True)
            row = {"tokens_per_image": (args.image_size // patch) ** 2}
            for attribute in ("colour", "shape"):
                labels = [truth[kg.entities[i]]["attributes"][attribute] for i in objects]
                row[attribute] = probe_accuracy(pooled.numpy(), labels)
                row[f"{attribute}_chance"] = 1 / len(set(labels))
            results[patch] = row
    rows = [(f"{p} px", r["tokens_per_image"], f"{r['colour']:.2f} ({r['colour_chance']:.2f})",
             f"{r['shape']:.2f} ({r['shape_chance']:.2f})") for p, r in results.items()]
    print(format_table(rows, ["patch", "tokens/image", "colour (chance)", "shape (chance)"],
                       title=f"linear probe on pooled features of a random tiny CLIP, "
                             f"{len(objects)} objects"))
    save("vision_probe", {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()

"""What a random-init tiny vision tower exposes: a linear probe from each object's pooled
patch features (mean over its images' tokens, layer -2) to its hidden colour and shape in
the synthetic KG, for several patch sizes. This is why the random tower of `preset: tiny`
(the demo's until it moved to the pre-trained tower) uses 4 px patches: the probe's shape
accuracy is near chance at 16 px.

    python bench/bench_vision_probe.py [--patches 16 8 4] [--entities 300]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

from elmm_ray.data.image_features import features_from_shards  # noqa: E402
from elmm_ray.data.kg import load_kg  # noqa: E402
from elmm_ray.data.shards import pack_images  # noqa: E402
from elmm_ray.data.synth import generate_synthetic_kg  # noqa: E402
from elmm_ray.models.backbone import build_tiny_llava, vision_tower_of  # noqa: E402
from elmm_ray.models.tower_pretrain import probe_accuracy  # noqa: E402
from elmm_ray.tables import format_table  # noqa: E402


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

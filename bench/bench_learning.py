"""Learning on the synthetic KG: tiny ELMM on CPU (single process, at most N minutes),
with images vs the no-image ablation (`mvtc.n_text=0 mvtc.n_visual=0`, which also turns
off the entity image adapter). Goal: test Hits@1 >= 0.5 with images and >= 0.15 above
the ablation.

    python bench/bench_learning.py [--minutes 5] [key=value ...]   (overrides for both runs)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, save  # noqa: E402

from elmm_ray.config import load_config  # noqa: E402
from elmm_ray.data.dataset import load_dataset  # noqa: E402
from elmm_ray.data.shards import pack_images  # noqa: E402
from elmm_ray.layout import absolute_paths  # noqa: E402
from elmm_ray.stages import run_stage  # noqa: E402
from elmm_ray.stages.train import evaluate  # noqa: E402
from elmm_ray.tables import format_table  # noqa: E402
from elmm_ray.train.context import load_trained_context  # noqa: E402
from elmm_ray.train.loop import train_local  # noqa: E402

DEMO = str(REPO_ROOT / "configs" / "demo.yaml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget per run")
    parser.add_argument("overrides", nargs="*", help="key=value applied to both runs")
    args = parser.parse_args()
    runs = {"with images": [], "no images (ablation)": ["mvtc.n_text=0", "mvtc.n_visual=0"]}
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_learning_") as tmp:
        root = Path(tmp)
        base = absolute_paths(load_config(DEMO, [f"run_dir={root / 'data'}",
                                                 *args.overrides]))
        run_stage("synth", base, show_progress=False)
        kg = load_dataset(base)
        pack_images(kg, root / "data" / "shards", use_ray=False)
        for i, (name, extra) in enumerate(runs.items()):
            cfg = absolute_paths(load_config(DEMO, [
                                     f"run_dir={root / f'run{i}'}", "train.backend=local",
                                     f"dataset.path={root / 'data' / 'data'}",
                                     "dataset.name=synth",
                                     f"images.shard_dir={root / 'data' / 'shards'}",
                                     f"train.max_minutes={args.minutes}", *args.overrides,
                                     *extra]))
            summary = train_local(cfg, kg, show_progress=False)
            m = evaluate(cfg, kg, load_trained_context(cfg, kg))
            results[name] = {"steps": summary["steps"], "train_seconds": summary["train_seconds"],
                             **{d: {k: m[d][k] for k in ("mrr", "hits@1", "hits@3", "hits@10")}
                                for d in ("overall", "tail", "head")}}
    rows = [(name, r["steps"], f"{r['train_seconds']:.0f}", f"{r['overall']['mrr']:.3f}",
             f"{r['overall']['hits@1']:.3f}", f"{r['tail']['hits@1']:.3f}",
             f"{r['head']['hits@1']:.3f}", f"{r['overall']['hits@10']:.3f}")
            for name, r in results.items()]
    print(format_table(rows, ["run", "steps", "train s", "MRR", "Hits@1", "tail H@1",
                              "head H@1", "Hits@10"],
                       title=f"synthetic KG, test split, filtered, {kg.num_entities} entities"))
    with_img = results["with images"]["overall"]["hits@1"]
    without = results["no images (ablation)"]["overall"]["hits@1"]
    verdict = "met" if with_img >= 0.5 else "NOT met"
    print(f"Hits@1 with images {with_img:.3f} (goal >= 0.5): {verdict}"
          f"; margin over the ablation {with_img - without:+.3f} (goal >= 0.15): "
          f"{'met' if with_img - without >= 0.15 else 'NOT met'}")
    save("learning", {"args": vars(args), "results": results,
                      "margin_hits1": with_img - without})


if __name__ == "__main__":
    main()

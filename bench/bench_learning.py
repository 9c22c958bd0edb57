"""Learning on the synthetic KG (attributes visible only in the pictures, opaque names):
the tiny ELMM trained with the local backend on the demo settings, per direction, for the
entity representations and the ablations, and a repeat of the first run (same seed: the
figures must be identical), on the demo KG (300 entities) and a 1,000-entity KG.

    python bench/bench_learning.py [--entities 300,1000] [--minutes M] [--runs NAME,...]
                                   [--train-relations TEXT,...] [--keep DIR] [k=v ...]

Runs (``--runs``, default ``encoder,no-images,no-text-view,no-visual-view,repeat``):
``encoder`` (model.entity_repr=encoder, the demo's), ``table`` (the learnable table + image
adapter), ``table+encoder``, ``no-images`` (mvtc.n_text=0 mvtc.n_visual=0), ``no-text-view``
(mvtc.n_text=0), ``no-visual-view`` (mvtc.n_visual=0), ``repeat`` (the first run again).
Each run trains in one process with the demo's global batch (``train.batch_size`` x
``train.num_workers``). Each KG size gets the demo's training settings plus
``SIZE_SETTINGS`` (a larger KG has more steps per epoch, so it runs fewer epochs to stay
within ~6 minutes of one CPU thread).
``--train-relations`` trains on the training triples of those relations only (their texts, e.g.
``"has colour,has pattern"``; an ablation: which relations interfere with which); validation
and the test ranking are unchanged (every relation, filtered by every split).
Results go to ``results/learning_<entities>.json``, each run with its test Hits@1 per relation
and direction (``per_relation``: the attributes of issue 22), also printed as a table.
Targets (issue 10): test Hits@1 >= 0.60 overall, head >= 0.50, tail >= 0.70; no-image
ablation >= 0.30 lower overall.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, save  # noqa: E402

from elmm_ray.config import load_config  # noqa: E402
from elmm_ray.data.dataset import load_dataset  # noqa: E402
from elmm_ray.data.shards import pack_images  # noqa: E402
from elmm_ray.layout import RunLayout, absolute_paths  # noqa: E402
from elmm_ray.stages import run_stage  # noqa: E402
from elmm_ray.stages.train import evaluate  # noqa: E402
from elmm_ray.tables import format_table  # noqa: E402
from elmm_ray.train.context import load_trained_context  # noqa: E402
from elmm_ray.train.loop import train_local  # noqa: E402

DEMO = str(REPO_ROOT / "configs" / "demo.yaml")
RUNS = {
    "encoder": ["model.entity_repr=encoder"],
    "table": ["model.entity_repr=table"],
    "table+encoder": ["model.entity_repr=table+encoder"],
    "no-images": ["model.entity_repr=encoder", "mvtc.n_text=0", "mvtc.n_visual=0"],
    "no-text-view": ["model.entity_repr=encoder", "mvtc.n_text=0"],
    "no-visual-view": ["model.entity_repr=encoder", "mvtc.n_visual=0"],
}
METRICS = ("mrr", "hits@1", "hits@3", "hits@10")
DEFAULT_RUNS = "encoder,no-images,no-text-view,no-visual-view,repeat"
# Per KG size, on top of configs/demo.yaml (chosen in results/learning_search.md).
SIZE_SETTINGS: dict[int, list[str]] = {300: [], 1000: ["train.epochs=2"]}


def per_relation_hits1(metrics: dict) -> dict:
    """Test Hits@1 (filtered) per relation and direction, the attributes of item 5 of issue
    22: the evaluation's own breakdown (``relations``) in this file's layout."""
    return {entry["relation"]: {d: {"queries": entry[d]["count"], "hits@1": entry[d]["hits@1"]}
                                for d in ("tail", "head") if d in entry}
            for entry in metrics["relations"]}


def train_only(kg, relations: list[str]) -> None:
    """Keep only the training triples of ``relations`` (relation texts); an unknown text is
    an error naming the relations there are."""
    unknown = [r for r in relations if r not in kg.relation_texts]
    if unknown:
        raise SystemExit(f"--train-relations: {unknown} not among the KG's relations "
                         f"{kg.relation_texts}")
    keep = [kg.relation_texts.index(r) for r in relations]
    kg.filter_index()  # the ranking's filter (every split): built and cached from all triples
    train = kg.triples["train"]
    kg.triples["train"] = train[np.isin(train[:, 1], keep)]
    print(f"training on {len(kg.triples['train'])} of {len(train)} training triples "
          f"({', '.join(relations)})", flush=True)


def run_size(entities: int, names: list[str], args: argparse.Namespace) -> None:
    """Every run of ``names`` on a synthetic KG of ``entities``; prints the table and the
    target checks, saves ``results/<name or learning_<entities>>.json``."""
    results = {}
    sized = [f"dataset.synth.num_entities={entities}", *SIZE_SETTINGS.get(entities, [])]
    with contextlib.ExitStack() as stack:
        root = Path(args.keep) / str(entities) if args.keep else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_learning_")))
        base = absolute_paths(load_config(DEMO, [f"run_dir={root / 'data'}", *sized,
                                                 *args.overrides]))
        run_stage("synth", base, show_progress=False)
        # One process with the demo's global batch (the same objective as its Ray workers).
        batch = f"train.global_batch_size={base.train.global_batch_size}"
        kg = load_dataset(base)
        if args.train_relations:
            train_only(kg, args.train_relations)
        pack_images(kg, root / "data" / "shards", use_ray=False, show_progress=False)
        for i, name in enumerate(names):
            extra = RUNS[names[0] if name == "repeat" else name]
            cfg = absolute_paths(load_config(DEMO, [
                f"run_dir={root / f'run{i}'}", "train.backend=local",
                f"dataset.path={root / 'data' / 'data'}", "dataset.name=synth",
                f"images.shard_dir={root / 'data' / 'shards'}", *sized, batch,
                *([f"train.max_minutes={args.minutes}"] if args.minutes else []), *extra,
                *args.overrides]))
            if args.keep:  # a run directory bench/bench_stage_probe.py reads
                RunLayout.of(cfg).write_config(cfg)
            summary = train_local(cfg, kg, show_progress=False)
            ctx = load_trained_context(cfg, kg)
            m = evaluate(cfg, kg, ctx)
            results[name] = {"overrides": [*sized, batch, *extra], "steps": summary["steps"],
                             "train_seconds": summary["train_seconds"],
                             "per_relation": per_relation_hits1(m),
                             "seconds_per_step":
                                 summary["train_seconds"] / max(1, summary["steps"]),
                             **{d: {k: m[d][k] for k in METRICS}
                                for d in ("overall", "tail", "head")}}
            save(args.name or f"learning_{entities}", {  # after every run: nothing is lost
                "command": "python bench/bench_learning.py " + shlex.join(sys.argv[1:]),
                "args": vars(args), "entities": entities, "results": results,
                "finished": False})
            r = results[name]
            print(f"{entities} entities, {name}: {r['steps']} steps {r['train_seconds']:.0f}s  "
                  f"Hits@1 {r['overall']['hits@1']:.3f} (tail {r['tail']['hits@1']:.3f}, head "
                  f"{r['head']['hits@1']:.3f})", flush=True)
    rows = [(name, r["steps"], f"{r['train_seconds']:.0f}", f"{r['overall']['mrr']:.3f}",
             f"{r['overall']['hits@1']:.3f}", f"{r['tail']['hits@1']:.3f}",
             f"{r['head']['hits@1']:.3f}", f"{r['overall']['hits@10']:.3f}")
            for name, r in results.items()]
    print(format_table(rows, ["run", "steps", "train s", "MRR", "Hits@1", "tail H@1",
                              "head H@1", "Hits@10"],
                       title=f"synthetic KG, test split, filtered, {kg.num_entities} entities"))
    relations = list(next(iter(results.values()))["per_relation"])
    cells = [(name, *("/".join(f"{r['per_relation'][rel][d]['hits@1']:.2f}"
                               for d in ("tail", "head") if d in r["per_relation"][rel])
                      or "-" for rel in relations))  # "-": no test query of the relation
             for name, r in results.items()]
    print(format_table(cells, ["run", *relations],
                       title="Hits@1 per relation, tail / head (test, filtered)"))
    checks = {}
    first = results[names[0]]
    checks["hits1_overall>=0.60"] = first["overall"]["hits@1"] >= 0.60
    checks["hits1_head>=0.50"] = first["head"]["hits@1"] >= 0.50
    checks["hits1_tail>=0.70"] = first["tail"]["hits@1"] >= 0.70
    if "no-images" in results:
        margin = first["overall"]["hits@1"] - results["no-images"]["overall"]["hits@1"]
        checks["no_image_margin>=0.30"] = margin >= 0.30
    if "repeat" in results and not args.minutes:
        checks["repeat_identical"] = all(
            abs(results["repeat"][d][k] - first[d][k]) <= 1e-6
            for d in ("overall", "tail", "head") for k in METRICS)
    for check, ok in checks.items():
        print(f"{check}: {'met' if ok else 'NOT met'}")
    save(args.name or f"learning_{entities}", {
        "command": "python bench/bench_learning.py " + shlex.join(sys.argv[1:]),
        "args": vars(args), "entities": entities, "results": results, "checks": checks,
        "finished": True})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entities", default="300,1000",
                        help="synthetic KG sizes, comma-separated")
    parser.add_argument("--minutes", type=float, default=None,
                        help="a time budget per run (default: the config's epochs; with a time "
                        "budget the repeat is not comparable)")
    parser.add_argument("--runs", default=DEFAULT_RUNS)
    parser.add_argument("--train-relations", default="", metavar="TEXT,...",
                        type=lambda v: [r.strip() for r in v.split(",") if r.strip()],
                        help="train on these relations' triples only (an ablation)")
    parser.add_argument("--keep", default=None, metavar="DIR",
                        help="keep the run directories in DIR/<entities>/run<i> (e.g. for "
                        "bench/bench_stage_probe.py) instead of a temporary directory")
    parser.add_argument("--name", default=None,
                        help="results file (default learning_<E>; one size only)")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every run")
    args = parser.parse_args()
    names = [n for n in args.runs.split(",") if n]
    unknown = [n for n in names if n not in RUNS and n != "repeat"]
    if unknown:
        parser.error(f"--runs: unknown {unknown}; choose from {[*RUNS, 'repeat']}")
    sizes = [int(x) for x in args.entities.split(",") if x]
    if args.name and len(sizes) > 1:
        parser.error("--name needs a single --entities size")
    for entities in sizes:
        run_size(entities, names, args)


if __name__ == "__main__":
    main()

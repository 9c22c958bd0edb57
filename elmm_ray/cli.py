"""`elmm-ray`: one subcommand per stage, each a few lines over :mod:`elmm_ray.pipeline`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from elmm_ray.config import Config, ConfigError, load_config
from elmm_ray.data.kg import DatasetError, load_kg
from elmm_ray.tables import format_table

log = logging.getLogger("elmm_ray")


def _config(args: argparse.Namespace) -> Config:
    from elmm_ray.pipeline import absolute_paths

    return absolute_paths(load_config(args.config, args.overrides))


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = _config(args)
    print(f"{args.config}: OK (run_dir={cfg.run_dir}, dataset={cfg.dataset.name}, "
          f"backbone={cfg.model.backbone}, train.backend={cfg.train.backend})")
    return 0


def print_stats(stats: dict, warnings: list[str]) -> None:
    rows = [("entities", f"{stats['entities']:,}"), ("relations", f"{stats['relations']:,}")]
    rows += [(f"triples: {s}", f"{n:,}") for s, n in stats["triples"].items()]
    rows += [
        ("images found", f"{stats['images_found']:,}"),
        ("entities with images", f"{stats['entities_with_images']:,}"),
        ("entities without images", f"{stats['entities_without_images']:,}"),
        ("entities without text", f"{stats['entities_without_text']:,}"),
    ]
    rows += [(f"relations {c}", str(n)) for c, n in stats["relation_categories"].items()]
    rows += [(f"duplicate rows: {s}", f"{n:,}") for s, n in stats["duplicate_triples"].items()]
    print(format_table(rows, title=f"dataset {stats['name']}"))
    for w in warnings:
        print(f"warning: {w}")


def cmd_stats(args: argparse.Namespace) -> int:
    kg = load_kg(args.dataset_dir, format=args.format, image_root=args.image_root)
    stats = kg.stats()
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print_stats(stats, kg.report.warnings)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from elmm_ray.data.synth import synth_from_config

    overrides = [f"dataset.synth.{o}" for o in args.overrides]
    cfg = load_config(None, overrides)
    report = synth_from_config(cfg.dataset.synth, Path(args.out_dir))
    rows = [("entities", report.num_entities), ("relations", report.num_relations)]
    rows += [(f"triples: {s}", n) for s, n in report.triples.items()]
    rows += [("images written", report.images_written), ("faults injected", len(report.faults))]
    print(format_table(rows, title=f"synthetic KG in {report.out_dir}"))
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from elmm_ray import pipeline

    if Path(args.config).is_dir():
        # `elmm-ray pack DATASET_DIR OUT_DIR [key=value ...]`
        if not args.overrides or "=" in args.overrides[0]:
            raise ConfigError(["`elmm-ray pack DATASET_DIR OUT_DIR`: OUT_DIR is missing"])
        out_dir, rest = args.overrides[0], args.overrides[1:]
        cfg = load_config(None, [f"dataset.path={args.config}", "dataset.name=dataset",
                                 f"images.shard_dir={out_dir}",
                                 f"run_dir={Path(out_dir) / '_run'}", *rest])
    else:
        cfg = _config(args)
        pipeline.run_synth(cfg)
    result = pipeline.run_pack(cfg)
    print(format_table(result.summary_rows(), title=f"image shards in {result.out_dir}"))
    bad = result.manifest["bad_images"]
    if bad:
        print(f"{len(bad)} image file(s) left out (listed in {result.out_dir / 'manifest.json'}):")
        for b in bad[:20]:
            print(f"  {b['path']}: {b['reason']}")
        if len(bad) > 20:
            print(f"  ... and {len(bad) - 20} more")
    return 0


def _config_or_run_dir(target: str, overrides: list[str]) -> Config:
    """A config file, or a run directory holding the resolved ``config.yaml``."""
    path = Path(target)
    if path.is_dir():
        resolved = path / "config.yaml"
        if not resolved.is_file():
            raise FileNotFoundError(f"{path} is a folder without config.yaml (not a run dir)")
        cfg = load_config(resolved, [f"run_dir={path}", *overrides])
    else:
        cfg = load_config(path, overrides)
    from elmm_ray.pipeline import absolute_paths

    return absolute_paths(cfg)


def print_metrics(metrics: dict, title: str) -> None:
    from elmm_ray.eval.report import format_metrics_table

    print(f"{title} ({metrics['split']}, {metrics['num_queries']:,} queries, filtered)")
    print(format_metrics_table(metrics))


def _packed(cfg: Config):
    """Synth (for the synthetic dataset), load and pack: what every later stage needs."""
    from elmm_ray import pipeline

    pipeline.run_synth(cfg)
    kg = pipeline.load_dataset(cfg)
    pipeline.run_pack(cfg, kg)
    return kg


def cmd_train(args: argparse.Namespace) -> int:
    from elmm_ray import pipeline

    cfg = _config(args)
    kg = _packed(cfg)
    summary = pipeline.run_train(cfg, kg)
    print(f"trained {summary['steps']} steps in {summary['train_seconds']:.1f} s; model in "
          f"{pipeline.trained_model_dir(cfg)}")
    print_metrics(summary["metrics"], "test metrics of the trained model")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from elmm_ray import pipeline
    from elmm_ray.export import is_export

    if is_export(args.config):
        split = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("eval.split=")),
                     "")
        metrics = pipeline.eval_export(args.config, split=split)
        print_metrics(metrics, f"evaluation of the exported model {args.config}")
        return 0
    cfg = _config_or_run_dir(args.config, args.overrides)
    metrics = pipeline.run_eval(cfg)
    print_metrics(metrics, f"evaluation of {pipeline.trained_model_dir(cfg)}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from elmm_ray import pipeline

    cfg = _config(args)
    result = pipeline.run_extract(cfg, _packed(cfg))
    print(format_table(result.summary_rows(), title=f"feature store {result.store_dir}"))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from elmm_ray.pruning.run import run_prune

    cfg = _config_or_run_dir(args.config, args.overrides)
    report = run_prune(cfg)
    print(f"pruned model and report in {Path(cfg.run_dir) / 'prune'}")
    md = Path(cfg.run_dir) / "prune" / "prune_report.md"
    if md.is_file():
        print(md.read_text())
    return 0 if report else 1


def cmd_export(args: argparse.Namespace) -> int:
    from elmm_ray import pipeline

    cfg = _config_or_run_dir(args.run_dir, args.overrides)
    out = pipeline.run_export(cfg, out_dir=args.out)
    print(f"exported the trained model of {cfg.run_dir} to {out}")
    return 0


def _read_query_tsv(path: str) -> list[tuple[str, str]]:
    rows = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected 'head<TAB>relation', got {line!r}")
        rows.append((parts[0].strip(), parts[1].strip()))
    return rows


def cmd_predict(args: argparse.Namespace) -> int:
    from elmm_ray.export import load_export

    if bool(args.head) == bool(args.input):
        raise ValueError("give either --head NAME_OR_ID --relation REL, or --input FILE.tsv")
    exported = load_export(args.model_dir)
    pairs = _read_query_tsv(args.input) if args.input else [(args.head, args.relation)]
    heads = [exported.entity_id(h) for h, _ in pairs]
    rels = [exported.relation_id(r) for _, r in pairs]
    results = exported.predict(heads, rels, inverse=args.inverse, k=args.k)
    for (head, rel), answers in zip(pairs, results):
        arrow = f"(?, {rel}, {head})" if args.inverse else f"({head}, {rel}, ?)"
        rows = [(rank, exported.entities[e], exported.entity_names[e], f"{score:.3f}")
                for rank, (e, score) in enumerate(answers, 1)]
        print(format_table(rows, ["rank", "id", "name", "score"], title=arrow))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from elmm_ray import pipeline

    cfg = _config(args)
    result = pipeline.run_all(cfg)
    overall = result["metrics"]["overall"]
    visual = ("all patch tokens" if cfg.model.uncompressed
              else f"{cfg.mvtc.n_visual + cfg.mvtc.n_text} MVTC")
    rows = [
        ("dataset", result["dataset"]),
        ("model", f"{cfg.model.backbone} ({result['parameters']:,} parameters)"),
        ("visual tokens per query", visual),
        ("MRR", f"{overall['mrr']:.4f}"),
        *[(f"Hits@{k}", f"{overall[f'hits@{k}']:.4f}") for k in cfg.eval.hits_at],
        ("train time", f"{result['train_seconds']:.1f} s"
         + (" (already trained: skipped)" if result["skipped_training"] else "")),
        ("exported model", result["export_dir"]),
    ]
    print(format_table(rows, title=f"results ({cfg.eval.split}, filtered, both directions)"))
    stage_rows = [(stage, f"{seconds:.1f}") for stage, seconds in result["timings"].items()]
    print(format_table(stage_rows, ["stage", "seconds"], title="wall time by stage"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elmm-ray",
        description="Train, compress and evaluate ELMM multimodal KG-completion models on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, help: str):
        p = sub.add_parser(name, help=help)
        p.add_argument("config", help="YAML config (see configs/)")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=2")
        return p

    with_config("validate", "check a config without running anything").set_defaults(
        func=cmd_validate)
    with_config("run", "the main job: synth -> pack -> extract -> train -> eval -> export"
                ).set_defaults(func=cmd_run)
    with_config("train", "train a model (train.backend=local or ray)").set_defaults(
        func=cmd_train)
    p = with_config("eval", "filtered ranking: CONFIG, RUN_DIR or an exported MODEL_DIR")
    p.set_defaults(func=cmd_eval)
    with_config("extract", "image features into the feature store (Ray Data; packs first)"
                ).set_defaults(func=cmd_extract)
    p = with_config("prune", "prune the trained model (prune.method, prune.ratio), fine-tune, "
                    "report: CONFIG or RUN_DIR")
    p.set_defaults(func=cmd_prune)
    p = sub.add_parser("export", help="write the trained model as a self-contained directory")
    p.add_argument("run_dir", help="run directory (or its config)")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--out", default=None, help="default: RUN_DIR/export")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("predict", help="top-k answers of (head, relation, ?) from an export")
    p.add_argument("model_dir")
    p.add_argument("--head", help="entity id or name")
    p.add_argument("--relation", help="relation id or text")
    p.add_argument("--input", help="TSV of head<TAB>relation rows (batch form)")
    p.add_argument("--inverse", action="store_true", help="ask (?, relation, head) instead")
    p.add_argument("--k", type=int, default=10)
    p.set_defaults(func=cmd_predict)
    p = with_config("pack", "pack images into Parquet shards: CONFIG, or DATASET_DIR OUT_DIR")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("stats", help="counts of a dataset folder")
    p.add_argument("dataset_dir")
    p.add_argument("--format", default="auto", choices=["auto", "mkgformer", "openke"])
    p.add_argument("--image-root", default=None, help="default: DATASET_DIR/images")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("synth", help="write a synthetic multimodal KG (MKGformer layout)")
    p.add_argument("out_dir")
    p.add_argument("overrides", nargs="*",
                   help="dataset.synth fields as key=value, e.g. num_entities=2000 "
                        "inject_faults=true")
    p.set_defaults(func=cmd_synth)
    return parser


def job_main(command: str, argv: list[str] | None = None) -> int:
    """Entry of ``jobs/<stage>.py``: ``--config PATH [key=value ...]`` -> ``elmm-ray COMMAND``,
    so that `ray job submit` and the CLI run one code path."""
    parser = argparse.ArgumentParser(prog=f"jobs/{command}.py")
    parser.add_argument("--config", required=True, help="YAML config (or run dir for eval)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    return main([command, args.config, *args.overrides])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, DatasetError, FileNotFoundError, KeyError, ValueError) as err:
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

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
    return load_config(args.config, args.overrides)


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


def cmd_run(args: argparse.Namespace) -> int:
    from elmm_ray import pipeline
    from elmm_ray.rundir import RunDir

    cfg = _config(args)
    RunDir(cfg.run_dir).write_config(cfg)
    pipeline.run_synth(cfg)
    kg = pipeline.load_dataset(cfg)
    print_stats(kg.stats(), kg.report.warnings)
    result = pipeline.run_pack(cfg, kg)
    print(format_table(result.summary_rows(), title=f"image shards in {result.out_dir}"))
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
    with_config("run", "the pipeline: synth -> pack -> stats").set_defaults(func=cmd_run)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, DatasetError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

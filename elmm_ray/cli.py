"""`elmm-ray`: one subcommand per stage, each a few lines over the stage units of
:mod:`elmm_ray.stages` (``run``: :mod:`elmm_ray.pipeline`); ``jobs/*.py`` call the same."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from elmm_ray import console
from elmm_ray.config import Config, ConfigError, format_keys, json_schema, load_config
from elmm_ray.config.keys import keys_epilog
from elmm_ray.data.kg import DatasetError, load_kg
from elmm_ray.layout import RunLayout, absolute_paths, read_json
from elmm_ray.plan.command import add_arguments, check_before_run, run_plan_command
from elmm_ray.remote import is_uri
from elmm_ray.tables import format_table

# Commands that run a stage import the stage units (torch, transformers, Ray) when they run,
# so that `validate`, `config`, `stats` and `--help` answer in a fraction of a second.

log = logging.getLogger("elmm_ray")


def _config(args: argparse.Namespace) -> Config:
    return _run_logs(absolute_paths(load_config(args.config, args.overrides)))


def _run_logs(cfg: Config) -> Config:
    """Commands that work in a run directory log there (``<run_dir>/logs/``)."""
    layout = RunLayout.of(cfg)  # root: the local mirror of a run directory on object storage
    if console.attach_log_file(layout.root) is not None:
        _STATE["run_dir"], _STATE["layout"] = str(layout.root), layout
    return cfg


_STATE: dict = {"run_dir": None, "layout": None}


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = absolute_paths(load_config(args.config, args.overrides))  # writes nothing
    print(f"{args.config}: OK (run_dir={cfg.run_dir}, dataset={cfg.dataset.name}, "
          f"backbone={cfg.model.backbone}, train.backend={cfg.train.backend})")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.action == "keys":
        print(format_keys(args.section))
        return 0
    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        print(f"JSON Schema of the config written to {args.out}")
    else:
        print(text, end="")
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
    rows += [(f"{k} only in valid/test", f"{n:,}") for k, n in stats["unseen_in_train"].items()]
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


def print_rows(rows: list, title: str) -> None:
    print(format_table([tuple(r) for r in rows], title=title))


def cmd_pack(args: argparse.Namespace) -> int:
    from elmm_ray.stages import run_stage

    if Path(args.config).is_dir():
        # `elmm-ray pack DATASET_DIR OUT_DIR [key=value ...]`
        if not args.overrides or "=" in args.overrides[0]:
            raise ConfigError(["`elmm-ray pack DATASET_DIR OUT_DIR`: OUT_DIR is missing"])
        out_dir, rest = args.overrides[0], args.overrides[1:]
        cfg = absolute_paths(load_config(None, [
            f"dataset.path={args.config}", "dataset.name=dataset",
            f"images.shard_dir={out_dir}", f"run_dir={Path(out_dir) / '_run'}", *rest]))
    else:
        cfg = _config(args)
    result = run_stage("pack", cfg)
    m = result.manifest
    print_rows(m["summary_rows"], f"image shards in {m['shard_dir']}")
    if m["bad_images_total"]:
        print(f"{m['bad_images_total']} image file(s) left out (listed in "
              f"{Path(m['shard_dir']) / 'manifest.json'}):")
        for b in m["bad_images"]:
            print(f"  {b['path']}: {b['reason']}")
        if m["bad_images_total"] > len(m["bad_images"]):
            print(f"  ... and {m['bad_images_total'] - len(m['bad_images'])} more")
    return 0


def _config_or_run_dir(target: str, overrides: list[str]) -> Config:
    """A config file, or a run directory (a local path or a URI) holding the resolved
    ``config.yaml``."""
    if is_uri(target):
        probe = load_config(None, [f"run_dir={target}", *[o for o in overrides if o.startswith(
            "storage_endpoint=")]])
        layout = RunLayout.of(probe)
        layout.pull()
        if not layout.config_file.is_file():
            raise FileNotFoundError(f"{target} holds no config.yaml (not a run directory)")
        return _run_logs(absolute_paths(load_config(layout.config_file,
                                                    [f"run_dir={target}", *overrides])))
    path = Path(target)
    if path.is_dir():
        resolved = path / "config.yaml"
        if not resolved.is_file():
            raise FileNotFoundError(f"{path} is a folder without config.yaml (not a run dir)")
        cfg = load_config(resolved, [f"run_dir={path}", *overrides])
    else:
        cfg = load_config(path, overrides)
    return _run_logs(absolute_paths(cfg))


def print_metrics(metrics: dict, title: str) -> None:
    from elmm_ray.eval.report import format_metrics_table

    print(f"{title} ({metrics['split']}, {metrics['num_queries']:,} queries, filtered)")
    print(format_metrics_table(metrics))


def _print_eval(cfg: Config, title: str) -> None:
    print_metrics(read_json(RunLayout.of(cfg).metrics_file(cfg.eval.split)), title)


def cmd_train(args: argparse.Namespace) -> int:
    from elmm_ray.stages import run_stages

    cfg = _config(args)
    results = run_stages(["train", "eval"], cfg)
    train = results["train"].manifest
    state = " (already trained: skipped)" if results["train"].skipped else ""
    print(f"trained {train['steps']} steps in {train['train_seconds']:.1f} s{state}; model in "
          f"{train['model_dir']}")
    _print_eval(cfg, "metrics of the trained model")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from elmm_ray.export import is_export
    from elmm_ray.stages import run_stage
    from elmm_ray.stages.export import eval_export

    if is_export(args.config):
        allowed = ("eval.split", "eval.max_queries")
        given = dict(o.split("=", 1) for o in args.overrides if "=" in o)
        unknown = [k for k in given if k not in allowed]
        if unknown:
            raise ConfigError([f"`{k}`: an exported model takes only {', '.join(allowed)}"
                               for k in unknown])
        max_queries = given.get("eval.max_queries")
        metrics = eval_export(args.config, split=given.get("eval.split", ""),
                              max_queries=int(max_queries) if max_queries else None)
        print_metrics(metrics, f"evaluation of the exported model {args.config}")
        return 0
    cfg = _config_or_run_dir(args.config, args.overrides)
    run_stage("eval", cfg)
    _print_eval(cfg, f"evaluation of {RunLayout.of(cfg).trained_model}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from elmm_ray.stages import run_stage

    m = run_stage("extract", _config(args)).manifest
    print_rows(m["summary_rows"], f"feature store {m['store']}")
    failed = m.get("failed_images", [])  # none from precomputed embeddings
    for item in failed[:20]:
        print(f"  failed: {item['entity_id']} image {item['image_index']}: {item['reason']}")
    if len(failed) > 20:
        print(f"  ... and {len(failed) - 20} more (listed in the store's manifest.json)")
    return 0


def cmd_entity_init(args: argparse.Namespace) -> int:
    from elmm_ray.stages import run_stage

    result = run_stage("entity_init", _config(args))
    m = result.manifest
    rows = [("entities", f"{m['entities']:,}"), ("width", str(m["embed_dim"])),
            ("seconds", f"{m['seconds']:.1f}"),
            ("status", "already complete (no work)" if result.skipped else "complete")]
    print(format_table(rows, title=f"initial entity table {m['path']}"))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from elmm_ray.stages import run_stage

    cfg = _config_or_run_dir(args.config, args.overrides)
    manifest = run_stage("prune", cfg).manifest
    print(f"pruned model and report in {RunLayout.of(cfg).stage_dir('prune')}")
    print(Path(manifest["report"]).read_text())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from elmm_ray.data.dataset import load_dataset
    from elmm_ray.export import CARD_FILE, MARKER
    from elmm_ray.stages import run_stage, run_stages
    from elmm_ray.stages.export import export_needs, export_on_ray, export_run

    overrides = [*args.overrides]
    if args.checkpoint:
        overrides.append(f"export.checkpoint={args.checkpoint}")
    cfg = _config_or_run_dir(args.run_dir, overrides)
    if args.out:  # a one-off copy elsewhere: not the run's export stage
        run_stages(list(export_needs(cfg)), cfg)
        out = (export_on_ray(cfg, args.out) if cfg.train.backend == "ray"
               else export_run(cfg, load_dataset(cfg), args.out))
    else:
        out = Path(run_stage("export", cfg).manifest["out_dir"])
    meta = read_json(out / MARKER)
    record = (meta.get("checkpoint") or {}).get("record") or {}
    at = (f" (step {record['step']}, val MRR {record['val_mrr']:.4f})"
          if record.get("val_mrr") is not None else "")
    print(f"exported the {cfg.export.checkpoint} weights{at} of {cfg.run_dir} to {out}")
    adapter = meta.get("adapter")
    print(f"  model card: {out / CARD_FILE}")
    print(f"  PEFT adapter: {out / 'adapter'} (base: {adapter['base_model']})" if adapter
          else "  no PEFT adapter: LoRA was off in this run")
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


def cmd_tune(args: argparse.Namespace) -> int:
    from elmm_ray.tune.space import load_space
    from elmm_ray.tune.sweep import format_results, run_sweep

    cfg = _config(args)
    space = load_space(args.space, cfg)
    result = run_sweep(cfg, space)
    print(f"shared stages (run once): {', '.join(result.shared_stages) or 'none'}; "
          f"each trial runs: {', '.join(result.trial_stages)}")
    print(format_results(result.rows, list(space.params), result.front))
    for metric, path in result.best.items():
        print(f"best by {metric}: {path}")
    if result.front:
        print(f"Pareto front (* above): {result.out_dir / 'pareto.png'}")
    print(f"table: {result.out_dir / 'results.csv'}; Tune experiment: "
          f"{result.out_dir / 'experiment'}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    return run_plan_command(absolute_paths(load_config(args.config, args.overrides)), args)


def cmd_run(args: argparse.Namespace) -> int:
    from elmm_ray.eval.report import relation_table  # torch: not for every command
    from elmm_ray.pipeline import run_all

    cfg = _config(args)
    if cfg.train.use_gpu:  # the plan's one line first; a plan that does not fit is refused
        check_before_run(cfg, args.ignore_plan)
    result = run_all(cfg)
    layout = RunLayout.of(cfg)
    metrics = result["metrics"]
    overall = metrics["overall"]
    visual = ("all patch tokens" if cfg.model.uncompressed
              else f"{cfg.mvtc.n_visual + cfg.mvtc.n_text} MVTC")
    rows = [
        ("dataset", result["dataset"]),
        ("model", f"{cfg.model.backbone} ({result['parameters']:,} parameters)"),
        ("visual tokens per query", visual),
        ("MRR", f"{overall['mrr']:.4f}"),
        *[(f"Hits@{k}", f"{overall[f'hits@{k}']:.4f}") for k in cfg.eval.hits_at],
        *[(f"Hits@{k} tail / head", f"{metrics['tail'][f'hits@{k}']:.4f} / "
           f"{metrics['head'][f'hits@{k}']:.4f}") for k in cfg.eval.hits_at[:1]
          if "tail" in metrics and "head" in metrics],
        ("train time", f"{result['train_seconds']:.1f} s"
         + (" (already trained: skipped)" if result["skipped_training"] else "")),
        ("exported model", layout.display(result["export_dir"])),
    ]
    print(format_table(rows, title=f"results ({cfg.eval.split}, filtered, both directions)"))
    if not result.get("pruned"):  # the eval stage's model (a pruned one is evaluated by prune)
        by_relation = relation_table(layout.metrics_file(cfg.eval.split), cfg.eval.hits_at[0],
                                     cfg.eval.split, layout.display)
        if by_relation:
            print(by_relation)
    stage_rows = [(stage, f"{seconds:.1f}") for stage, seconds in result["timings"].items()]
    print(format_table(stage_rows, ["stage", "seconds"], title="wall time by stage"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elmm-ray",
        description="Train, compress and evaluate ELMM multimodal KG-completion models on Ray.",
        epilog="Every command that takes a CONFIG accepts key=value overrides; "
               "`elmm-ray config keys [SECTION]` lists every key with its default, allowed "
               "values and help; `elmm-ray COMMAND --help` names the keys that matter for "
               "that command. Logs of a run: <run_dir>/logs/ (-v shows them live).",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show everything on the console: INFO logs, Ray's and the "
                        "workers' output, library progress bars (otherwise they go to "
                        "<run_dir>/logs/)")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, help: str):
        p = sub.add_parser(name, help=help, description=help, epilog=keys_epilog(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("config", help="YAML config (see configs/)")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=2")
        return p

    with_config("validate", "check a config without running anything").set_defaults(
        func=cmd_validate)
    p = with_config("run", "the main job: synth -> pack -> extract -> train -> eval -> export")
    p.add_argument("--ignore-plan", action="store_true", help="with train.use_gpu: run even "
                   "when `elmm-ray plan` says it does not fit (jobs: ELMM_IGNORE_PLAN=1)")
    p.set_defaults(func=cmd_run)
    p = with_config("plan", "memory per GPU, time and cost of every stage, from the "
                    "checkpoint's config.json alone (nothing downloaded); exit 3: does not fit")
    add_arguments(p)  # --cluster, --json, --space, --mfu
    p.set_defaults(func=cmd_plan)
    with_config("train", "train a model (train.backend=local or ray)").set_defaults(
        func=cmd_train)
    p = with_config("eval", "filtered ranking: CONFIG, RUN_DIR or an exported MODEL_DIR")
    p.set_defaults(func=cmd_eval)
    with_config("extract", "image features into the feature store (Ray Data; packs first)"
                ).set_defaults(func=cmd_extract)
    with_config("entity_init", "the initial entity table: every entity through the untrained "
                "model (Ray Data; extracts first)").set_defaults(func=cmd_entity_init)
    p = with_config("prune", "prune the trained model (prune.method, prune.ratio), fine-tune, "
                    "report: CONFIG or RUN_DIR")
    p.set_defaults(func=cmd_prune)
    p = sub.add_parser("export", help="write the trained model as a self-contained directory "
                       "with a PEFT adapter and a model card", epilog=keys_epilog("export"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="run directory (or its config)")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--out", default=None, help="default: RUN_DIR/export")
    p.add_argument("--checkpoint", choices=["best", "last"], default=None,
                   help="last: the end of training; best: the validation round with the "
                   "highest val MRR. A pruned run: last = the pruned model after its final "
                   "fine-tuning, best = the best round of the last pruning round's "
                   "fine-tuning. Default: export.checkpoint (last)")
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

    p = with_config("tune", "a Ray Tune sweep over config keys (--space tune_spaces/NAME.yaml)")
    p.add_argument("--space", required=True, help="search space YAML (see tune_spaces/)")
    p.set_defaults(func=cmd_tune)
    p = sub.add_parser("config", help="every config key (type, default, allowed, help) or the "
                       "JSON Schema of the config")
    p.add_argument("action", choices=["keys", "schema"])
    p.add_argument("section", nargs="?", default=None,
                   help="keys: a section (train, dataset.synth) or one key; all when omitted")
    p.add_argument("--out", default=None, help="schema: write to this file instead of stdout")
    p.set_defaults(func=cmd_config)

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
    if command == "tune":
        parser.add_argument("--space", required=True, help="search space YAML")
    args = parser.parse_args(argv)
    extra = ["--space", args.space] if command == "tune" else []
    return main([command, args.config, *args.overrides, *extra], whole_process=True)


def main(argv: list[str] | None = None, *, whole_process: bool | None = None) -> int:
    """``whole_process`` (default: when reading ``sys.argv``): this command owns the
    process, so native libraries' known console noise may be filtered out."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow options (`tune CONFIG --space S key=value`)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-")
                                                    for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not args.verbose and (argv is None if whole_process is None else whole_process):
        console.filter_native_stderr()
    console.setup(args.verbose)
    _STATE["run_dir"] = _STATE["layout"] = None
    try:
        return args.func(args)
    except (ConfigError, DatasetError, OSError, KeyError, ValueError) as err:
        # Bad input (a file, a key, a value, a checkpoint, a cluster that refuses us): the
        # message without a traceback (-v shows it).
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        _finish_logs()


def _finish_logs() -> None:
    """Copy the local Ray session's logs next to the run's own log and say where they are."""
    run_dir = _STATE["run_dir"]
    if run_dir is None:
        return
    logs = Path(run_dir) / "logs"
    if "ray" in sys.modules:
        from elmm_ray.ray_session import save_ray_logs

        try:
            save_ray_logs(logs / "ray")
        except OSError as err:  # a full disk must not hide the command's own outcome
            log.warning("could not copy Ray's logs to %s: %s", logs / "ray", err)
    console.detach_log_file()
    layout = _STATE["layout"]
    if layout is not None and layout.remote and logs.is_dir():
        try:
            layout.push("logs")
        except OSError as err:
            log.warning("could not push the logs to %s: %s", layout.location, err)
    if logs.is_dir():
        print(f"logs: {logs}" + (f" (and {layout.location}/logs)" if layout is not None
                                  and layout.remote else ""), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

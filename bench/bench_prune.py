"""Pruning benchmark: accuracy vs real CPU speedup of every pruning method on the synthetic KG.

A mid-size CPU model (the LLM dominates query-encoding time) is trained briefly with the
local trainer; then, from that same trained model, each of {knowledge, magnitude, random}
x ratios {0.2, 0.3, 0.5} (several seeds: calibration sample, random units and fine-tuning
order) and attention-layer pruning with compensation (1 and 2 of the layers) is applied
and fine-tuned with the same budget. Every pruned model is timed in turns with the
unpruned one. Accuracy (and the latency columns of the main table) come from that trained
small model (hidden 256 by default); a second table (bench/prune_speed.py) times
knowledge-guided pruning at each ratio at the compression benchmark's mid shape (LLM
1024x8, random weights, the pruned model's real shapes), where the LLM dominates query
encoding. Writes bench/results/prune.{json,md,png}.

    .venv/bin/python bench/bench_prune.py               # full (~15 min on 2 CPU cores)
    .venv/bin/python bench/bench_prune.py --quick       # smoke run (~2 min)
    .venv/bin/python bench/bench_prune.py --speed-only  # the mid-shape speed table alone
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import shlex
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from bench.common import RESULTS, save  # noqa: E402
from bench.prune_speed import run_speed, speed_markdown, speed_table  # noqa: E402
from elmm_ray.config import load_config  # noqa: E402
from elmm_ray.data.dataset import load_dataset  # noqa: E402
from elmm_ray.layout import absolute_paths, read_json, write_json_atomic  # noqa: E402
from elmm_ray.models.build import build_tokenizer  # noqa: E402
from elmm_ray.models.lora import CheckpointMismatchError, merge_lora  # noqa: E402
from elmm_ray.pruning.base import sample_queries  # noqa: E402
from elmm_ray.pruning.report import (  # noqa: E402
    overall_metrics,
    render_markdown,
    summarise,
    timing_batches,
    write_report,
)
from elmm_ray.stages import run_stage  # noqa: E402
from elmm_ray.stages.prune import (  # noqa: E402
    calibration_data,
    finetune,
    finetune_config,
    measure,
    prune_schedule,
)
from elmm_ray.stages.train import evaluate  # noqa: E402
from elmm_ray.tables import format_table  # noqa: E402
from elmm_ray.train.context import ModelContext, entity_texts, load_trained_context  # noqa: E402
from elmm_ray.train.loop import train_local  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default=str(REPO_ROOT / "runs" / "prune_bench"))
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--methods", default="knowledge,magnitude,random")
    parser.add_argument("--ratios", default="0.2,0.3,0.5")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per structured setting")
    parser.add_argument("--attention-ratios", default="0.25,0.5",
                        help="shares of layers for attention pruning ('' = none)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--entities", type=int, default=300)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--lora", action="store_true",
                        help="train (and fine-tune) LoRA adapters instead of the whole LLM")
    parser.add_argument("--finetune-steps", type=int, default=20)
    parser.add_argument("--finetune-lr", type=float, default=3e-4,
                        help="peak learning rate of the post-pruning fine-tuning "
                        "(prune.finetune_lr)")
    parser.add_argument("--prune-steps", type=int, default=1, help="iterative rounds")
    parser.add_argument("--calib-samples", type=int, default=64,
                        help="calibration queries of the structured pruners")
    parser.add_argument("--attention-calib-samples", type=int, default=256,
                        help="calibration queries of attention pruning (forward passes only)")
    parser.add_argument("--no-control", action="store_true",
                        help="skip the unpruned model fine-tuned with the same budget")
    parser.add_argument("--repeats", type=int, default=7, help="timed passes per model")
    parser.add_argument("--retrain", action="store_true", help="train again even if saved")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default); 1 is the most stable on a "
                        "shared machine")
    parser.add_argument("--latency-batch", type=int, default=64, help="queries per timed batch")
    parser.add_argument("--name", default="prune", help="results name under bench/results")
    parser.add_argument("--speed-shape", choices=("mid", "small", "quick", "none"), default="mid",
                        help="shape of the speed table of knowledge-guided pruning (random "
                        "weights; bench/encode_timing.py SHAPES), none = skip it")
    parser.add_argument("--speed-tokens", type=int, default=144,
                        help="patch tokens per image (10 images) of the speed table")
    parser.add_argument("--speed-batch", type=int, default=32,
                        help="queries per timed batch of the speed table (32: training's)")
    parser.add_argument("--speed-repeats", type=int, default=5)
    parser.add_argument("--speed-all-ratios", default="0.3",
                        help="also time removing these shares of ALL model parameters (the "
                        "002 paper's measure; '' = none)")
    parser.add_argument("--speed-only", action="store_true",
                        help="only the speed table; the rest of NAME.json is kept")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the md/png/json of bench/results/NAME.json from its runs")
    args = parser.parse_args(argv)
    if args.lora and args.run_dir == str(REPO_ROOT / "runs" / "prune_bench"):
        args.run_dir += "_lora"
    if args.quick:
        args.ratios, args.seeds, args.methods = "0.3", 1, "knowledge,magnitude,random"
        args.attention_ratios, args.train_steps, args.finetune_steps = "0.25", 60, 5
        args.calib_samples, args.repeats, args.run_dir = 16, 5, args.run_dir + "_quick"
        args.attention_calib_samples = 32
        args.name = args.name + "_quick"
        args.speed_shape, args.speed_tokens, args.speed_batch = "quick", 16, 4
        args.speed_repeats = 3
    return args


def bench_config(args: argparse.Namespace):
    overrides = [  # the random tiny tower (preset tiny): what results/prune*.json measured
        f"run_dir={args.run_dir}", "model.preset=tiny", "train.backend=local", "ray.num_cpus=2",
        f"dataset.synth.num_entities={args.entities}",
        f"model.llm_hidden={args.hidden}", f"model.llm_layers={args.layers}",
        f"model.llm_heads={args.heads}", f"model.llm_kv_heads={args.kv_heads}",
        f"model.llm_intermediate={args.intermediate}",
        f"train.max_steps={args.train_steps}", "train.epochs=100", "train.global_batch_size=32",
        "train.eval_every=null", "train.val_max_queries=200", "train.warmup_steps=20",
        "eval.split=test", f"prune.finetune_steps={args.finetune_steps}",
        f"prune.steps={args.prune_steps}", f"prune.finetune_lr={args.finetune_lr}",
        f"prune.calib_samples={args.calib_samples}",
        "prune.knowledge_weight=0.5", "prune.min_neurons_per_layer=8",
        f"lora.enabled={str(args.lora).lower()}",
    ]
    return load_config(REPO_ROOT / "configs" / "demo.yaml", overrides)


def ensure_trained(cfg, kg, args) -> dict:
    """Train once per model/data settings (a marker file records them)."""
    marker = Path(cfg.run_dir) / "bench_trained.json"
    settings = {"model": dataclasses.asdict(cfg.model), "train": dataclasses.asdict(cfg.train),
                "synth": dataclasses.asdict(cfg.dataset.synth),
                "lora": dataclasses.asdict(cfg.lora)}
    if not args.retrain and marker.is_file():
        saved = read_json(marker)
        # fields added to the schema since the marker was written do not force a retrain
        if all(saved["settings"].get(section, {}).get(key) == value
               for section, values in settings.items() for key, value in values.items()
               if key in saved["settings"].get(section, {})):
            return saved
    start = time.perf_counter()
    summary = train_local(cfg, kg, show_progress=False)
    metrics = evaluate(cfg, kg, load_trained_context(cfg, kg))
    record = {"settings": settings, "seconds": time.perf_counter() - start,
              "steps": summary["steps"], "metrics": overall_metrics(metrics),
              "first_loss": summary["losses"][0], "last_loss": summary["losses"][-1]}
    write_json_atomic(marker, record)
    return record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_only:
        write_outputs(read_json(RESULTS / f"{args.name}.json"), args.name)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    cfg = absolute_paths(bench_config(args))
    run_stage("pack", cfg, show_progress=False)
    kg = load_dataset(cfg)
    command = "python bench/bench_prune.py " + shlex.join(argv if argv is not None
                                                          else sys.argv[1:])
    if args.speed_only:
        saved = RESULTS / f"{args.name}.json"
        if not saved.is_file():
            raise SystemExit(f"--speed-only adds the speed table to {saved}, which does not "
                             "exist: run the benchmark without --speed-only first")
        payload = read_json(saved)
        payload["speed"] = speed_section(cfg, kg, args) | {"command": command}
        write_outputs(payload, args.name)
        return 0
    trained = ensure_trained(cfg, kg, args)
    print(f"trained: {trained['steps']} steps in {trained['seconds']:.0f}s, "
          f"test {trained['metrics']}", flush=True)

    try:
        base_ctx = load_trained_context(cfg, kg)
    except CheckpointMismatchError as error:  # the model code changed since training
        print(f"saved model does not fit the current code ({str(error)[:120]}...): retraining")
        args.retrain = True
        trained = ensure_trained(cfg, kg, args)
        base_ctx = load_trained_context(cfg, kg)
    merge_lora(base_ctx.model)
    base = base_ctx.model.eval()
    base_metrics = overall_metrics(evaluate(cfg, kg, base_ctx))
    batches = timing_batches(base_ctx.collator, base_ctx.features,
                             sample_queries(kg.queries("test"), 10**9, 0), args.latency_batch, 1)

    def fresh_context() -> ModelContext:
        return ModelContext(copy.deepcopy(base), base_ctx.tokenizer, base_ctx.collator,
                            base_ctx.features)

    runs, attention = [], []
    ft_train = dataclasses.replace(cfg.train, val_max_queries=25,
                                   learning_rate=args.finetune_lr)
    for seed in range(0 if args.no_control else args.seeds):
        # control: the unpruned model with the same fine-tuning budget
        t0 = time.perf_counter()
        run_cfg = dataclasses.replace(cfg, prune=dataclasses.replace(cfg.prune, seed=seed),
                                      train=ft_train)
        ctx = fresh_context()
        finetune(finetune_config(run_cfg), kg, ctx, f"bench/control_{seed}", False)
        post = overall_metrics(evaluate(run_cfg, kg, ctx))
        runs.append({"method": "finetune-only", "ratio": 0.0, "seed": seed, "speedup": 1.0,
                     "removed_share": 0.0, "pre_ft": base_metrics, "post_ft": post,
                     "retained_hits1": (post["hits@1"] / base_metrics["hits@1"]
                                        if base_metrics["hits@1"] else None),
                     "seconds": time.perf_counter() - t0})
        print(f"control seed {seed}: hits@1 {base_metrics['hits@1']:.3f} -> "
              f"{post['hits@1']:.3f} ({runs[-1]['seconds']:.0f}s)", flush=True)
    settings = [(m, float(r), s) for m in args.methods.split(",") if m
                for r in args.ratios.split(",") if r for s in range(args.seeds)]
    settings += [("attention", float(r), 0) for r in args.attention_ratios.split(",") if r]
    for method, ratio, seed in settings:
        t0 = time.perf_counter()
        calib = args.attention_calib_samples if method == "attention" else args.calib_samples
        run_cfg = dataclasses.replace(cfg, prune=dataclasses.replace(
            cfg.prune, method=method, ratio=ratio, seed=seed, calib_samples=calib),
            train=ft_train)
        ctx = fresh_context()
        data = calibration_data(run_cfg, kg, ctx, holdout=method == "attention")
        schedule = prune_schedule(run_cfg, kg, ctx, data,
                                  out_prefix=f"bench/{method}_{ratio}_{seed}")
        measured = measure({"unpruned": base, "pruned": ctx.model}, batches,
                           repeats=args.repeats, base="unpruned")["pruned"]
        row = {"method": method, "ratio": ratio, "seed": seed, **measured,
               "removed_share": schedule["removed_share"], "pre_ft": schedule["pre_ft"],
               "post_ft": schedule["post_ft"],
               "retained_hits1": (schedule["post_ft"]["hits@1"] / base_metrics["hits@1"]
                                  if base_metrics["hits@1"] else None),
               "finetune": [r.get("finetune") for r in schedule["rounds"]],
               "prune_seconds": sum(r["prune_seconds"] for r in schedule["rounds"]),
               "seconds": time.perf_counter() - t0}
        if method == "attention":
            report = schedule["rounds"][0]["report"]
            row["label"] = f"{len(report['pruned_layers'])}/{args.layers} layers"
            attention.append({"label": f"ratio {ratio} (layers {report['pruned_layers']})",
                              "layers": report["layers"]})
        runs.append(row)
        print(f"{method:9s} {ratio:.2f} seed {seed}: speedup {row['speedup']:.2f}x "
              f"hits@1 {row['pre_ft']['hits@1']:.3f} -> {row['post_ft']['hits@1']:.3f} "
              f"(removed {row['removed_share']:.3f}, {row['seconds']:.0f}s)", flush=True)

    base_measure = measure({"unpruned": base}, batches, repeats=args.repeats,
                           base="unpruned")["unpruned"]
    speed = speed_section(cfg, kg, args)
    base_row = {"method": "none", "ratio": 0.0, "seed": 0, **base_measure,
                "pre_ft": base_metrics, "post_ft": base_metrics, "retained_hits1": 1.0,
                "removed_share": 0.0}
    payload = {
        "command": command,
        "settings": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                     "kv_heads": args.kv_heads, "intermediate": args.intermediate,
                     "entities": args.entities, "train_steps": trained["steps"],
                     "finetune_steps": args.finetune_steps, "finetune_lr": args.finetune_lr,
                     "lora": args.lora, "prune_steps": args.prune_steps,
                     "calib_samples": args.calib_samples, "seeds": args.seeds,
                     "threads": torch.get_num_threads()},
        "base": base_row, "runs": runs, "attention": attention, "trained": trained,
        "speed": speed | {"command": command} if speed else None,
        "notes": [
            f"latency: {args.repeats} timed passes encoding one batch of {args.latency_batch} "
            f"test queries (LoRA merged, {torch.get_num_threads()} thread(s)), each pruned "
            "model timed in turns with the unpruned one; Latency and Speedup use the median "
            "CPU time of the encoding thread (robust on this shared machine: waiting for a "
            "core does not count), Wall speedup the best wall-clock times",
            "peak act. mem: peak of the memory one forward allocates beyond the weights "
            "(PyTorch profiler)",
            "compression = share of the LLM's q/k/v/o + MLP parameters removed; attention "
            "rows: decoder layers whose attention sublayer became a compensation map",
            f"Hits@1 (pruned) = right after pruning, (+FT) = after {args.finetune_steps} "
            f"fine-tuning steps (peak lr {args.finetune_lr:g}, "
            f"{'LoRA' if args.lora else 'whole LLM'}) with L_task + 0.5 L_knowledge per "
            "round; ± = std over seeds (calibration sample, random units, fine-tuning order)",
            f"attention pruning: {args.attention_calib_samples} calibration queries, full-rank "
            "W, ridge 1e-3; reconstruction errors over their tokens (held-out: as many other "
            "training queries); Reduction (Fro) = 1 - ||h_out - h W||_F / ||h_out - h||_F, "
            "(MSE) the same with squared errors",
            "Full model + FT: the unpruned model fine-tuned with the same budget (control "
            "for what fine-tuning alone adds)",
        ],
        "seconds": time.perf_counter() - started,
    }
    write_outputs(payload, args.name)
    return 0


def speed_section(cfg, kg, args: argparse.Namespace) -> dict | None:
    """The mid-shape speed table (bench/prune_speed.py), printed; None when skipped."""
    if args.speed_shape == "none":
        return None
    texts = entity_texts(kg)
    tokenizer = build_tokenizer(cfg, texts + list(kg.relation_texts))
    ratios = [float(r) for r in args.ratios.split(",") if r]
    all_ratios = tuple(float(r) for r in args.speed_all_ratios.split(",") if r)
    speed = run_speed(kg, tokenizer, texts, ratios, all_ratios=all_ratios,
                      shape_name=args.speed_shape,
                      tokens=args.speed_tokens, batch_size=args.speed_batch,
                      repeats=args.speed_repeats, min_neurons=cfg.prune.min_neurons_per_layer,
                      log=lambda line: print(line, flush=True))
    rows, headers, title = speed_table(speed)
    print(format_table(rows, headers, title=title), flush=True)
    return speed


def write_outputs(payload: dict, name: str) -> None:
    """Table rows from the runs, then bench/results/<name>.{json,md,png}."""
    base = payload.get("base") or next(r for r in payload["rows"] if r["method"] == "none")
    payload["rows"] = summarise([base, *payload["runs"]])
    title = "Pruning on the synthetic KG (CPU)"
    paths = write_report(RESULTS, payload, name=name, title=title)
    if payload.get("speed"):
        with paths["md"].open("a") as md:
            md.write("\n" + speed_markdown(payload["speed"]))
    save(name, payload)
    print(render_markdown(payload, title))
    print(f"wrote {paths['md']} and {paths['png']} ({payload['seconds']:.0f}s benchmark)")


if __name__ == "__main__":
    sys.exit(main())

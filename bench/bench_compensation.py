"""Compensation benchmark: how well a map replaces each removed attention sublayer.

On the model bench_prune.py trains (hidden 256, 4 layers, 300 steps on the synthetic KG;
shared run directory, trained once), for every decoder layer's attention sublayer: the
reduction of the reconstruction error (MSE and Frobenius, against plain removal) of ELMM's
own-state map (``linear``) and of the token-mixing map (``linear_mean``: plus a map of the
causal running mean of the states), on the calibration tokens and on held-out queries;
sweeps over ridge, rank and calibration count; where the error sits (by position: token
mixing); layer order (two layers removed bottom-up with re-calibration vs both fitted on the
unpruned model at once) with the error of the final hidden states and Hits@1; CPU latency.
Writes bench/results/<name>.{json,md}.

    .venv/bin/python bench/bench_compensation.py            # full (~5 min on 2 CPU cores)
    .venv/bin/python bench/bench_compensation.py --quick    # smoke run (~2 min)
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import bench_prune  # noqa: E402
from bench.common import RESULTS, save  # noqa: E402
from elmm_ray.data.dataset import load_dataset  # noqa: E402
from elmm_ray.layout import absolute_paths  # noqa: E402
from elmm_ray.models.lora import merge_lora  # noqa: E402
from elmm_ray.models.surgery import (  # noqa: E402
    LinearCompensation,
    decoder_layers,
    replace_attention,
)
from elmm_ray.pruning.attention import (  # noqa: E402
    AttentionIO,
    AttentionPlan,
    AttentionPruner,
    attention_similarity,
    collect_layers_io,
)
from elmm_ray.pruning.base import CalibrationData, PruneOptions, sample_queries  # noqa: E402
from elmm_ray.pruning.compensation import fit_compensation, reconstruction_errors  # noqa: E402
from elmm_ray.pruning.report import overall_metrics, timing_batches  # noqa: E402
from elmm_ray.stages import run_stage  # noqa: E402
from elmm_ray.stages.prune import measure  # noqa: E402
from elmm_ray.stages.train import evaluate  # noqa: E402
from elmm_ray.train.context import ModelContext, load_trained_context  # noqa: E402

FAMILIES = ("linear", "linear_mean")
DEFAULT_RIDGE, DEFAULT_CALIB = 1e-3, 256
POSITION_BUCKETS = ((0, 1), (1, 4), (4, 12), (12, 20), (20, 10**6))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--calib", default="32,64,128,256,512,1024",
                        help="calibration query counts (the largest is used by the sweeps)")
    parser.add_argument("--holdout", type=int, default=512,
                        help="held-out training queries: half pick the ridge, half report")
    parser.add_argument("--ridges", default="1e-1,1e-2,1e-3,1e-4,1e-5,1e-6")
    parser.add_argument("--ranks", default="8,32,64,128,0", help="0 = full rank")
    parser.add_argument("--repeats", type=int, default=7, help="timed passes per model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="compensation")
    args = parser.parse_args(argv)
    if args.quick:
        args.calib, args.holdout, args.ridges = "32,128", 128, "1e-2,1e-3,1e-5"
        args.ranks, args.repeats, args.name = "32,0", 3, args.name + "_quick"
    return args


def reductions(io: AttentionIO, fit, rows: slice | np.ndarray = slice(None)) -> dict:
    """MSE and Frobenius reduction of ``fit`` vs plain removal on ``io`` (rows)."""
    context = io.context[rows] if fit.uses_context else None
    e = reconstruction_errors(io.inputs[rows], io.outputs[rows], fit, context)
    mse = 1 - e["compensated_mse"] / e["removal_mse"] if e["removal_mse"] else 0.0
    return {"fro": e["reduction"], "mse": mse, "removal_fro": e["removal_fro"],
            "compensated_fro": e["compensated_fro"]}


def fit(io: AttentionIO, family: str, ridge: float, rank: int = 0, tokens: int | None = None):
    cut = slice(None, tokens)
    return fit_compensation(io.inputs[cut], io.outputs[cut], ridge=ridge, rank=rank,
                            context=io.context[cut] if family == "linear_mean" else None)


@torch.no_grad()
def positions(model, data: CalibrationData, queries: np.ndarray) -> torch.Tensor:
    """Position of every real token of ``queries`` (the row order of the collected states)."""
    out = []
    for batch, _ in data.batches(queries):
        _, mask, _ = model.build_prompt(batch)
        out.append(torch.arange(mask.shape[1]).expand_as(mask)[mask])
    return torch.cat(out)


@torch.no_grad()
def final_states(model, data: CalibrationData, queries: np.ndarray) -> torch.Tensor:
    """Last hidden states of the LLM at the real positions."""
    out = []
    for batch, _ in data.batches(queries):
        embeds, mask, _ = model.build_prompt(batch)
        hidden = model.language_model(inputs_embeds=embeds, attention_mask=mask.long())
        out.append(hidden.last_hidden_state[mask])
    return torch.cat(out)


def with_fits(base, fits: dict[int, object], hidden: int):
    """A copy of ``base`` whose listed layers use the given fits (``None``: plain removal)."""
    model = copy.deepcopy(base)
    for index, layer_fit in fits.items():
        mixed = layer_fit is not None and layer_fit.uses_context
        module = LinearCompensation(hidden, 0 if layer_fit is None else layer_fit.rank,
                                    context=mixed)
        if layer_fit is not None:
            module.load_fit(layer_fit)
        replace_attention(decoder_layers(model)[index], module)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    prune_args = bench_prune.parse_args(["--quick"] if args.quick else [])
    cfg = absolute_paths(bench_prune.bench_config(prune_args))
    run_stage("pack", cfg, show_progress=False)
    kg = load_dataset(cfg)
    trained = bench_prune.ensure_trained(cfg, kg, prune_args)
    ctx = load_trained_context(cfg, kg)
    merge_lora(ctx.model)
    base = ctx.model.eval()
    hidden = base.backbone.config.text_config.hidden_size
    n_layers = len(decoder_layers(base))
    counts = sorted(int(c) for c in args.calib.split(","))
    default_calib = min(DEFAULT_CALIB, counts[-1])
    counts = sorted(set(counts) | {default_calib})
    ridges = [float(r) for r in args.ridges.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    queries = sample_queries(kg.queries("train"), counts[-1] + args.holdout, 0)
    calib, held = queries[:counts[-1]], queries[counts[-1]:]
    val, test = held[: len(held) // 2], held[len(held) // 2:]
    data = CalibrationData(ctx.collator, ctx.features, calib, kg.filter_index(("train",)),
                           batch_size=16, holdout=test)
    layers = list(range(n_layers))
    similarity = attention_similarity(
        base, CalibrationData(ctx.collator, ctx.features, calib[:default_calib], data.known))
    t0 = time.perf_counter()
    cal_io = collect_layers_io(base, data, layers, calib, context=True)
    val_io = collect_layers_io(base, data, layers, val, context=True)
    test_io = collect_layers_io(base, data, layers, test, context=True)
    cal_pos = positions(base, data, calib)
    test_pos = positions(base, data, test)
    tokens_at = {c: int((cal_pos == 0).nonzero()[c][0]) if c < len(calib) else len(cal_pos)
                 for c in counts}  # position 0 starts each query's rows
    print(f"collected {len(cal_pos)} calibration / {len(test_pos)} held-out tokens "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)

    # ridge sweep (largest calibration set, full rank); the best ridge by the validation half
    ridge_rows, best_ridge = [], {}
    for layer in layers:
        for family in FAMILIES:
            scores = {}
            for ridge in ridges:
                f = fit(cal_io[layer], family, ridge)
                scores[ridge] = reductions(val_io[layer], f)["fro"]
                ridge_rows.append({"layer": layer, "family": family, "ridge": ridge,
                                   "calib": reductions(cal_io[layer], f),
                                   "heldout": reductions(test_io[layer], f)})
            best_ridge[(layer, family)] = max(scores, key=scores.get)
    print("ridge sweep done", flush=True)

    per_layer, rank_rows, calib_rows, position_rows = [], [], [], []
    for layer in layers:
        row = {"layer": layer, "similarity": similarity[layer]}
        for family in FAMILIES:
            ridge = best_ridge[(layer, family)]
            default = fit(cal_io[layer], family, DEFAULT_RIDGE,
                          tokens=tokens_at[default_calib])
            tuned = fit(cal_io[layer], family, ridge)
            row[family] = {
                "default": {"calib": reductions(cal_io[layer], default,
                                                slice(None, tokens_at[default_calib])),
                            "heldout": reductions(test_io[layer], default)},
                "tuned": {"ridge": ridge, "calib_queries": counts[-1],
                          "calib": reductions(cal_io[layer], tuned),
                          "heldout": reductions(test_io[layer], tuned)}}
            for rank in ranks:
                f = fit(cal_io[layer], family, ridge, rank=rank)
                rank_rows.append({"layer": layer, "family": family, "rank": rank,
                                  "ridge": ridge, "heldout": reductions(test_io[layer], f)})
            for count in counts:
                for r in sorted({DEFAULT_RIDGE, ridge}):
                    f = fit(cal_io[layer], family, r, tokens=tokens_at[count])
                    calib_rows.append({
                        "layer": layer, "family": family, "queries": count, "ridge": r,
                        "tokens": tokens_at[count],
                        "calib": reductions(cal_io[layer], f, slice(None, tokens_at[count])),
                        "heldout": reductions(test_io[layer], f)})
            for lo, hi in POSITION_BUCKETS:
                rows = ((test_pos >= lo) & (test_pos < hi)).nonzero().flatten()
                if len(rows):
                    red = reductions(test_io[layer], tuned, rows)
                    total = reductions(test_io[layer], tuned)
                    position_rows.append({
                        "layer": layer, "family": family, "positions": f"{lo}-{min(hi, 99) - 1}",
                        "tokens": len(rows), "heldout": red,
                        "share_of_removal_sq": red["removal_fro"] ** 2 / total["removal_fro"] ** 2,
                        "share_of_compensated_sq": (red["compensated_fro"] ** 2
                                                    / total["compensated_fro"] ** 2)})
        per_layer.append(row)
        print(f"layer {layer}: " + ", ".join(
            f"{fam} held-out Fro {row[fam]['default']['heldout']['fro']:.3f} -> "
            f"{row[fam]['tuned']['heldout']['fro']:.3f}" for fam in FAMILIES), flush=True)

    # layer order: the 2 most redundant layers, bottom-up with re-calibration vs at once
    chosen = sorted(sorted(layers, key=lambda i: -similarity[i])[:2])
    reference = final_states(base, data, test)
    removal = with_fits(base, dict.fromkeys(chosen), hidden)
    removal_err = float(torch.linalg.norm(final_states(removal, data, test) - reference))

    def downstream(model) -> dict:
        err = float(torch.linalg.norm(final_states(model, data, test) - reference))
        metrics = overall_metrics(evaluate(cfg, kg, ModelContext(
            model, ctx.tokenizer, ctx.collator, ctx.features)))
        return {"final_fro_reduction": 1 - err / removal_err, "hits@1": metrics["hits@1"],
                "mrr": metrics["mrr"]}

    order_rows = [{"variant": "unpruned", **{k: overall_metrics(evaluate(cfg, kg, ctx))[k]
                                             for k in ("hits@1", "mrr")},
                   "final_fro_reduction": 1.0},
                  {"variant": "plain removal", **downstream(removal)}]
    order_rows[-1]["final_fro_reduction"] = 0.0
    pruned_models = {}
    for family in FAMILIES:
        ridge = min(best_ridge[(i, family)] for i in chosen)
        at_once = with_fits(base, {i: fit(cal_io[i], family, ridge) for i in chosen}, hidden)
        order_rows.append({"variant": f"{family}, all at once", "ridge": ridge,
                           **downstream(at_once)})
        seq = copy.deepcopy(base)
        pruner = AttentionPruner(PruneOptions(ridge=ridge, compensation=family))
        plan = AttentionPlan(list(chosen), list(similarity), "ratio", 0.5)
        report = pruner.apply(seq, plan, data)
        order_rows.append({"variant": f"{family}, bottom-up re-calibrated", "ridge": ridge,
                           **downstream(seq.eval()),
                           "layers": [{"layer": r["layer"],
                                       "heldout_fro": r["holdout_errors"]["reduction"]}
                                      for r in report["layers"]]})
        pruned_models[family] = seq
        print(f"order {family}: {order_rows[-2]} / {order_rows[-1]}", flush=True)

    batches = timing_batches(ctx.collator, ctx.features,
                             sample_queries(kg.queries("test"), 10**9, 0), 64, 1)
    speed = measure({"unpruned": base, **pruned_models}, batches, repeats=args.repeats,
                    base="unpruned")
    speed = {name: {k: v[k] for k in ("latency_ms", "speedup", "speedup_wall", "llm_params")}
             for name, v in speed.items()}
    payload = {
        "command": "python bench/bench_compensation.py" + (" --quick" if args.quick else ""),
        "settings": {"hidden": hidden, "layers": n_layers, "train_steps": trained["steps"],
                     "calib_queries": counts, "calib_tokens": tokens_at,
                     "heldout_queries": len(test), "validation_queries": len(val),
                     "default_calib": default_calib, "ridges": ridges, "ranks": ranks,
                     "threads": torch.get_num_threads(),
                     "pruned_layers_for_order_and_speed": chosen},
        "per_layer": per_layer, "ridge_sweep": ridge_rows, "rank_sweep": rank_rows,
        "calib_sweep": calib_rows, "positions": position_rows, "layer_order": order_rows,
        "speed": speed, "seconds": time.perf_counter() - started,
    }
    save(args.name, payload)
    text = render(payload)
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)
    return 0


def _p(x: float) -> str:
    return f"{100 * x:.1f}%"


def render(payload: dict) -> str:
    s = payload["settings"]
    lines = [f"# Attention compensation (CPU, hidden {s['hidden']}, {s['layers']} layers, "
             f"{s['train_steps']} training steps)", "", f"Command: `{payload['command']}`", "",
             "Reduction = 1 - error(compensated) / error(plain removal), Fro = Frobenius norm, "
             "MSE = squared; held-out = other training queries never used in the fit. "
             f"Default = ridge {DEFAULT_RIDGE:g}, {s['default_calib']} calibration queries (the "
             f"prune stage's settings); tuned = ridge picked on {s['validation_queries']} "
             f"validation queries, {s['calib_queries'][-1]} calibration queries.", "",
             "## Per layer", "",
             "| Layer | Cos. sim. | Family | Default calib Fro / MSE | Default held-out Fro / MSE "
             "| Tuned ridge | Tuned calib Fro / MSE | Tuned held-out Fro / MSE |",
             "|---|---|---|---|---|---|---|---|"]
    for row in payload["per_layer"]:
        for fam in FAMILIES:
            d, t = row[fam]["default"], row[fam]["tuned"]
            lines.append(
                f"| {row['layer']} | {row['similarity']:.3f} | {fam} | {_p(d['calib']['fro'])} / "
                f"{_p(d['calib']['mse'])} | {_p(d['heldout']['fro'])} / {_p(d['heldout']['mse'])}"
                f" | {t['ridge']:g} | {_p(t['calib']['fro'])} / {_p(t['calib']['mse'])} | "
                f"{_p(t['heldout']['fro'])} / {_p(t['heldout']['mse'])} |")

    def sweep(title: str, rows: list, key: str, fmt) -> None:
        values = sorted({r[key] for r in rows}, key=lambda v: (v == 0, v)) if key == "rank" \
            else sorted({r[key] for r in rows}, reverse=key == "ridge")
        lines.extend(["", f"## {title}", "",
                      "| Layer | Family | " + " | ".join(fmt(v) for v in values) + " |",
                      "|---|---|" + "---|" * len(values)])
        for layer in sorted({r["layer"] for r in rows}):
            for fam in FAMILIES:
                cells = {r[key]: r for r in rows if r["layer"] == layer and r["family"] == fam}
                lines.append(f"| {layer} | {fam} | " + " | ".join(
                    _p(cells[v]["heldout"]["fro"]) for v in values) + " |")

    sweep("Ridge (held-out Fro reduction, largest calibration set, full rank)",
          payload["ridge_sweep"], "ridge", lambda v: f"ridge {v:g}")
    sweep("Rank (held-out Fro reduction, tuned ridge)", payload["rank_sweep"], "rank",
          lambda v: "full" if v == 0 else f"rank {v}")
    tuned = [r for r in payload["calib_sweep"]
             if r["ridge"] == next(p[r["family"]]["tuned"]["ridge"] for p in payload["per_layer"]
                                   if p["layer"] == r["layer"])]
    sweep("Calibration queries (held-out Fro reduction, tuned ridge, full rank)", tuned,
          "queries", lambda v: f"{v} q")
    default = [r for r in payload["calib_sweep"] if r["ridge"] == DEFAULT_RIDGE]
    sweep(f"Calibration queries (held-out Fro reduction, ridge {DEFAULT_RIDGE:g})", default,
          "queries", lambda v: f"{v} q")
    lines.extend(["", "## Where the error is: by token position (held-out, tuned)", "",
                  "| Layer | Family | Positions | Tokens | Share of removal error² | "
                  "Share of compensated error² | Fro reduction |", "|---|---|---|---|---|---|---|"])
    for r in payload["positions"]:
        lines.append(f"| {r['layer']} | {r['family']} | {r['positions']} | {r['tokens']} | "
                     f"{_p(r['share_of_removal_sq'])} | {_p(r['share_of_compensated_sq'])} | "
                     f"{_p(r['heldout']['fro'])} |")
    lines.extend(["", f"## Layer order: layers {s['pruned_layers_for_order_and_speed']} removed "
                  "(held-out final hidden states; Hits@1/MRR on the test split, no fine-tuning)",
                  "", "| Variant | Ridge | Final-state Fro reduction | Hits@1 | MRR | "
                  "Per-layer held-out Fro |", "|---|---|---|---|---|---|"])
    for r in payload["layer_order"]:
        per = ", ".join(f"L{x['layer']} {_p(x['heldout_fro'])}" for x in r.get("layers", []))
        lines.append(f"| {r['variant']} | {r.get('ridge', '-')} | "
                     f"{_p(r['final_fro_reduction'])} | {r['hits@1']:.3f} | {r['mrr']:.3f} | "
                     f"{per or '-'} |")
    lines.extend(["", "## CPU latency (1 batch of 64 test queries, same layers removed)", "",
                  "| Model | LLM params | Latency (ms, CPU time) | Speedup | Wall speedup |",
                  "|---|---|---|---|---|"])
    for name, v in payload["speed"].items():
        lines.append(f"| {name} | {v['llm_params'] / 1e6:.2f}M | {v['latency_ms']:.1f} | "
                     f"{v['speedup']:.2f}x | {v['speedup_wall']:.2f}x |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

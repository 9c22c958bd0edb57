"""`elmm-ray plan`: the whole plan of a config (and of a sweep), its table, its JSON, whether
it fits and what would make it fit."""

from __future__ import annotations

import dataclasses
import math
import random
import time

from elmm_ray.config import Config, max_workers
from elmm_ray.plan import DEFAULT_MFU
from elmm_ray.plan import estimate as E
from elmm_ray.plan.hardware import Hardware, dataset_counts, hardware_of
from elmm_ray.plan.meta import build_meta
from elmm_ray.tables import format_table


def _configured(name: str, cfg: Config) -> bool:
    if name.startswith("train"):
        return name == f"train ZeRO-{cfg.deepspeed.zero_stage}"  # 0/1: replicated grads
    return True


def make_plan(cfg: Config, cluster: str | None = None, mfu: float = DEFAULT_MFU) -> dict:
    """Every figure of the plan of ``cfg`` on the GPUs of ``cluster`` at ``mfu``."""
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu {mfu}: give the model-FLOPs utilisation as a fraction in (0, 1]")
    started = time.perf_counter()
    hw = hardware_of(cluster)
    counts = dataset_counts(cfg)
    meta = build_meta(cfg, counts.entities)
    stages, figures = E.stages(meta, cfg, counts, hw)
    precision = E.precision_of(cfg)
    usable = hw.memory_gib
    rows, too_big = [], []
    for s in stages:
        hours = s.hours(hw, precision, mfu)
        row = {"stage": s.name, "gpus": s.gpus, "gpu_memory_gib": s.memory["total"],
               "memory_parts_gib": s.memory, "flops": s.flops, "hours": hours,
               "gpu_hours": hours * s.gpus, "configured": _configured(s.name, cfg),
               "fits": s.memory["total"] <= usable, "note": s.note}
        if hw.usd_per_hour is not None:
            row["usd"] = hours * math.ceil(s.gpus / hw.gpus_per_instance) * hw.usd_per_hour
        rows.append(row)
        if row["configured"] and not row["fits"]:
            too_big.append(row)
    configured = [r for r in rows if r["configured"]]
    train = next(r for r in configured if r["stage"].startswith("train"))
    trainable = sum(meta.trainable.values())
    plan = {
        "config_backbone": cfg.model.backbone, "checkpoint": meta.source,
        "params_total": sum(meta.params.values()), "params_trainable": trainable,
        "params_by_group": meta.params, "trainable_by_group": meta.trainable,
        "checks": meta.checks, "dataset": dataclasses.asdict(counts),
        "hardware": dataclasses.asdict(hw), "precision": precision, "mfu": mfu,
        "workers": max_workers(cfg.train), "zero_stage": cfg.deepspeed.zero_stage,
        "stages": rows,
        "gpu_memory_gib": {r["stage"]: r["gpu_memory_gib"] for r in rows},
        "feature_store_gib": counts.images * meta.patch_tokens * meta.elmm.backbone.config
        .vision_config.hidden_size * 2 / E.GIB,
        **figures,
        "est_train_hours": train["hours"],
        "est_total_hours": sum(r["hours"] for r in configured),
        "est_gpu_hours": sum(r["gpu_hours"] for r in configured),
        "fits": not too_big,
        "reasons": [f"{r['stage']} needs {r['gpu_memory_gib']:.1f} GiB per GPU, the "
                    f"{hw.gpu} has {usable:g} GiB" for r in too_big],
        "estimated": ["activations of inference stages", "runtime reserve "
                      f"({E.RESERVE_GIB:g} GiB + {E.RESERVE_SHARE:.0%})", f"MFU {mfu:g}",
                      "prices (dated table, not fetched)",
                      "stage times count FLOPs only (no data loading, start-up or communication)"],
    }
    if "usd" in train:
        plan["est_usd"] = sum(r["usd"] for r in configured)
    plan["remedies"] = remedies(plan, cfg, hw) if too_big else []
    plan["plan_seconds"] = round(time.perf_counter() - started, 1)
    return plan


def remedies(plan: dict, cfg: Config, hw: Hardware) -> list[str]:
    """What would make each stage that does not fit fit, from the plan's own figures."""
    out = []
    by_name = {r["stage"]: r for r in plan["stages"]}
    room = (hw.memory_gib - E.RESERVE_GIB) / (1 + E.RESERVE_SHARE)
    for row in plan["stages"]:
        if not row["configured"] or row["fits"]:
            continue
        name, parts = row["stage"], row["memory_parts_gib"]
        batch_parts = [k for k in parts if k.startswith(("activations", "input features",
                                                         "entity scores", "MVTC", "LLM inter",
                                                         "hidden states", "layer inter",
                                                         "pixels"))]
        per_batch = sum(parts[k] for k in batch_parts)
        fixed = sum(v for k, v in parts.items() if k not in batch_parts and k != "total"
                    and not k.startswith("runtime"))
        if name.startswith("train"):
            z3 = by_name["train ZeRO-3"]
            z2 = by_name["train ZeRO-2"]
            if cfg.deepspeed.zero_stage < 2 and z2["fits"]:
                out.append(f"deepspeed.zero_stage=2 ({z2['gpu_memory_gib']:.1f} GiB)")
            if cfg.deepspeed.zero_stage < 3 and z3["fits"]:
                out.append(f"deepspeed.zero_stage=3 ({z3['gpu_memory_gib']:.1f} GiB)")
            micro = plan["micro_batch"]
            fit = math.floor(micro * (room - fixed) / per_batch) if per_batch else micro
            if 0 < fit < micro:
                total, need = cfg.train.global_batch_size, -(-micro * cfg.train.grad_accum // fit)
                accum = next(a for a in range(need, total + 1) if total % a == 0)
                out.append(f"a micro-batch of {fit} queries: train.grad_accum={accum} (the "
                           "global batch is kept; in-batch negatives come from one micro-step)")
            ckpt = by_name[name + " + grad ckpt"]
            if ckpt["fits"]:
                out.append(f"gradient checkpointing ({ckpt['gpu_memory_gib']:.1f} GiB; not "
                           "in elmm_ray's training loop yet)")
            visual = cfg.mvtc.n_visual + cfg.mvtc.n_text
            if visual:
                out.append(f"fewer MVTC tokens: the LLM's activations scale with the "
                           f"{plan['prompt_tokens']}-token prompt, {visual} of them MVTC")
        else:
            key = "eval.batch_size" if name == "eval" else "ray.data_batch_size"
            batch = cfg.eval.batch_size if name == "eval" else cfg.ray.data_batch_size
            fit = math.floor(batch * (room - fixed) / per_batch) if per_batch else 0
            out.append(f"{key}={fit} for {name}" if fit >= 1 else
                       f"{name}: the weights alone ({fixed:.1f} GiB) exceed the GPU")
        if not name.startswith("train") or not out:
            out.append(f"a GPU with more than {row['gpu_memory_gib']:.0f} GiB")
    return out


def summary_line(plan: dict) -> str:
    """The one line `elmm-ray run` prints before a GPU run."""
    mem = max(r["gpu_memory_gib"] for r in plan["stages"] if r["configured"])
    cost = f", ~${plan['est_usd']:,.0f}" if "est_usd" in plan else ""
    verdict = "fits" if plan["fits"] else "DOES NOT FIT: " + "; ".join(plan["reasons"])
    return (f"[plan] {plan['params_total'] / 1e9:.2f} B params "
            f"({plan['params_trainable'] / 1e6:.1f} M trained), peak {mem:.1f} GiB per "
            f"{plan['hardware']['gpu']}, train "
            f"~{plan['est_train_hours']:.1f} h on {plan['workers']} GPUs at MFU "
            f"{plan['mfu']:g}, {plan['est_gpu_hours']:.1f} GPU-h{cost}: {verdict}")


def _n(x: float) -> str:
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(x) >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:,.0f}"


def format_plan(plan: dict) -> str:
    hw = plan["hardware"]
    params = [(g, f"{n:,}", f"{plan['trainable_by_group'][g]:,}")
              for g, n in plan["params_by_group"].items() if n]
    params.append(("total", f"{plan['params_total']:,}", f"{plan['params_trainable']:,}"))
    d = plan["dataset"]
    lines = [f"checkpoint: {plan['checkpoint']}",
             *[f"  ok: {c}" for c in plan["checks"]],
             format_table(params, ["group", "parameters", "trained"], title="parameters"),
             f"dataset: {d['entities']:,} entities, {d['train']:,} / {d['valid']:,} / "
             f"{d['test']:,} triples, {d['images']:,} images ({d['source']})",
             f"feature store: {plan['feature_store_gib']:.1f} GiB (fp16); training: "
             f"{plan['train_steps']:,} steps, micro-batch {plan['micro_batch']} x "
             f"{plan['prompt_tokens']} tokens, {_n(plan['train_flops_per_step'])}FLOP per step",
             f"hardware: {hw['gpu']} ({hw['memory_gib']:g} GiB, "
             f"{hw['tflops'].get(plan['precision'])} TFLOP/s {plan['precision']}); "
             f"{hw['source']}"]
    rows = []
    for r in plan["stages"]:
        mark = "" if r["configured"] else " (alt)"
        cost = f"{r['usd']:,.0f}" if "usd" in r else "-"
        rows.append((r["stage"] + mark, r["gpus"], f"{r['gpu_memory_gib']:.1f}",
                     "yes" if r["fits"] else "NO", f"{_n(r['flops'])}", f"{r['hours']:.2f}",
                     f"{r['gpu_hours']:.1f}", cost))
    lines.append(format_table(rows, ["stage", "GPUs", "GiB/GPU", "fits", "FLOP", "hours",
                                     "GPU-h", "USD"],
                              title=f"per stage (time at MFU {plan['mfu']:g}; (alt): not "
                              "what the config runs)"))
    price = (f", ~${plan['est_usd']:,.0f} at {hw['instance']} ${hw['usd_per_hour']}/h "
             f"(prices of {hw['price_date']})" if "est_usd" in plan else "")
    lines.append(f"configured stages: ~{plan['est_total_hours']:.1f} h, "
                 f"{plan['est_gpu_hours']:.1f} GPU-h{price}")
    lines.append("estimated, not measured: " + "; ".join(plan["estimated"]))
    lines.append(f"fits: {'yes' if plan['fits'] else 'NO'}")
    lines += [f"  - {r}" for r in plan["reasons"]]
    if plan["remedies"]:
        lines.append("what would make it fit:")
        lines += [f"  - {r}" for r in plan["remedies"]]
    return "\n".join(lines)


def asha_fraction(trials: int, rounds: int, grace: int, eta: int) -> float:
    """The share of the trials' full budget ASHA spends when 1/eta of the trials go on at
    each rung (grace, grace*eta, ...): an estimate; real promotions depend on the results."""
    spent, alive, done, rung = 0.0, float(trials), 0, grace
    while alive >= 1 and done < rounds:
        step = min(rung, rounds) - done
        spent += alive * step
        done += step
        alive /= eta
        rung *= eta
    return spent / (trials * rounds) if trials and rounds else 1.0


def _sample(rng: random.Random, spec: dict) -> object:
    kind = spec["type"]
    if kind == "choice":
        return rng.choice(spec["values"])
    if kind == "randint":
        return rng.randrange(spec["low"], spec["high"])
    if kind == "loguniform":
        return math.exp(rng.uniform(math.log(spec["low"]), math.log(spec["high"])))
    return rng.uniform(spec["low"], spec["high"])


def space_plan(cfg: Config, space_path: str, cluster: str | None, mfu: float) -> dict:
    """A sweep's cost: its trials' plans (sampled with the sweep's seed), shared stages once."""
    from elmm_ray.config import config_to_dict
    from elmm_ray.config.load import build_config
    from elmm_ray.tune.space import load_space

    space = load_space(space_path, cfg)
    cfg = space.apply(cfg)
    tune = cfg.tune
    rng = random.Random(tune.seed)
    choices = {k: s["values"] for k, s in space.params.items() if s["type"] == "choice"}
    grid = tune.search == "grid"
    trials = tune.num_samples * (math.prod(len(v) for v in choices.values()) if grid else 1)
    plans: dict[str, dict] = {}
    costs = []
    for _ in range(min(trials, tune.num_samples if not grid else trials)):
        data = config_to_dict(cfg)
        for key, spec in space.params.items():
            value = _sample(rng, spec)
            section, *rest = key.split(".")
            target = data[section]
            for part in rest[:-1]:
                target = target[part]
            target[rest[-1]] = value
        trial = build_config(data)
        key = repr((trial.model, trial.mvtc, trial.lora, trial.train, trial.prune))
        if key not in plans:
            plans[key] = make_plan(trial, cluster, mfu)
        costs.append(plans[key])
    shared = {"extract"}
    per_trial = [sum(r["hours"] for r in p["stages"] if r["configured"] and
                     r["stage"] not in shared) for p in costs]
    mean = sum(per_trial) / len(per_trial)
    rounds = max(1, costs[0]["train_steps"] // cfg.train.eval_every) if cfg.train.eval_every \
        else cfg.train.epochs
    share = asha_fraction(trials, rounds, tune.grace_period, tune.reduction_factor) \
        if tune.scheduler == "asha" else 1.0
    first = costs[0]
    extract = sum(r["hours"] for r in first["stages"] if r["stage"] in shared)
    hours = extract + trials * mean * share / max(tune.max_concurrent_trials, 1)
    gpus = first["workers"]
    out = {"space": space_path, "trials": trials, "trials_planned": len(plans),
           "mean_trial_hours": mean, "max_trial_gpu_memory_gib": max(
               max(r["gpu_memory_gib"] for r in p["stages"] if r["configured"]) for p in costs),
           "all_fit": all(p["fits"] for p in costs), "asha_budget_share_estimate": share,
           "est_hours": hours, "est_gpu_hours": extract * gpus + trials * mean * share * gpus}
    if "est_usd" in first:
        hw = first["hardware"]
        out["est_usd"] = out["est_gpu_hours"] / hw["gpus_per_instance"] * hw["usd_per_hour"]
    return out


def format_space(s: dict) -> str:
    cost = f", ~${s['est_usd']:,.0f}" if "est_usd" in s else ""
    return (f"sweep {s['space']}: {s['trials']} trials ({s['trials_planned']} distinct plans), "
            f"a whole trial ~{s['mean_trial_hours']:.1f} h, peak "
            f"{s['max_trial_gpu_memory_gib']:.1f} GiB per GPU "
            f"({'all fit' if s['all_fit'] else 'NOT ALL FIT'}); ASHA spends "
            f"~{s['asha_budget_share_estimate']:.0%} of the full budget (an estimate: 1/eta of "
            f"the trials promoted per rung); sweep ~{s['est_hours']:.1f} h, "
            f"{s['est_gpu_hours']:.1f} GPU-h{cost}")

"""One Ray Tune trial: the sampled config in its own run directory, upstream stages linked
from the sweep's shared run, the remaining stages run (training reports every validation
round to Tune), then the trial's cost measured and reported with its last validation
figures."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import re
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from elmm_ray.config import Config, build_config, config_from_dict, config_to_dict
from elmm_ray.data.dataset import load_dataset
from elmm_ray.data.kg import KnowledgeGraph
from elmm_ray.eval.evaluate import encode_queries
from elmm_ray.faults import fault_point
from elmm_ray.layout import RunLayout, read_json
from elmm_ray.models.build import reads_images
from elmm_ray.models.lora import merge_lora
from elmm_ray.stages import STAGES, run_stages
from elmm_ray.train.context import ModelContext, final_context

TRIALS_SUBDIR = "trials"
COMPLETE = "trial_complete"


def trial_config(base: Config, params: dict, run_dir: str | Path) -> Config:
    """``base`` with the sampled ``params`` (dotted key -> value), in ``run_dir``."""
    data = config_to_dict(base)
    data["run_dir"] = str(run_dir)
    for key, value in params.items():
        node = data
        *sections, leaf = key.split(".")
        for section in sections:
            node = node[section]
        node[leaf] = value.item() if isinstance(value, np.generic) else value
    return build_config(data)


def link_upstream(shared: RunLayout, trial: RunLayout, stages: list[str]) -> None:
    """Make the ``stages`` complete in the trial's run directory without running them: their
    artifacts are links to the shared run's, their manifests copies."""
    trial.root.mkdir(parents=True, exist_ok=True)
    for name in stages:
        for rel in STAGES[name].artifacts:
            source, target = shared.path(rel), trial.path(rel)
            if source.exists() and not (target.exists() or target.is_symlink()):
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(source, target, target_is_directory=source.is_dir())
        manifest = shared.manifest_path(name)
        if manifest.is_file():
            trial.manifest_path(name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(manifest, trial.manifest_path(name))


def visual_tokens(cfg: Config, tokens_per_image: int) -> int:
    """Visual tokens in one query's prompt: the MVTC tokens, or every patch token of every
    image in the uncompressed baseline, or none."""
    if not reads_images(cfg):
        return 0
    if cfg.model.uncompressed:
        return tokens_per_image * cfg.images.max_images_per_entity
    return cfg.mvtc.n_visual + cfg.mvtc.n_text


@torch.no_grad()
def query_latency_ms(ctx: ModelContext, queries: np.ndarray, batch: int, repeats: int) -> float:
    """Median wall time (ms) to encode a fixed batch of queries, after one warm-up pass."""
    chunk = queries[:batch]
    encode_queries(ctx.model, ctx.collator, ctx.features, chunk, batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        encode_queries(ctx.model, ctx.collator, ctx.features, chunk, batch)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def reset_peak_rss() -> bool:
    """Count this process's peak resident memory afresh from now (Linux: ``/proc/self/
    clear_refs``), so that a trial in a reused Tune actor reports its own peak, not an
    earlier trial's; False where the OS offers no reset. What an earlier trial freed is
    collected and handed back to the OS first (glibc keeps freed heap otherwise), so the
    count starts from what this process needs, not from what it once held."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MiB) since :func:`reset_peak_rss` (Linux's
    VmHWM), else since it started."""
    try:
        match = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        match = None
    if match:
        return int(match.group(1)) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def cost_metrics(cfg: Config, kg: KnowledgeGraph) -> dict:
    """Cost of the trial's final model as deployed (pruned when the trial pruned, LoRA
    merged): visual tokens per query, LLM parameters, query-encoding latency, peak memory."""
    ctx = final_context(cfg, kg)
    merge_lora(ctx.model)  # as deployed: adapters folded into the weights
    ctx.model.eval()
    llm = ctx.model.language_model
    tokens_per_image = int(ctx.features.feature_shape[0])
    queries = kg.queries(cfg.eval.split)
    order = np.random.default_rng(cfg.tune.seed).permutation(len(queries))
    return {"visual_tokens": visual_tokens(cfg, tokens_per_image),
            "llm_params": int(sum(p.numel() for p in llm.parameters())),
            "latency_ms": query_latency_ms(ctx, queries[order], cfg.tune.latency_batch,
                                           cfg.tune.latency_repeats),
            "peak_rss_mb": peak_rss_mb()}


def run_trial(config: dict) -> None:
    """The Tune function trainable. ``config``: ``base`` (the sweep's resolved config),
    ``shared`` (stages to link from the base run), ``stages`` (stages to run here) and the
    sampled dotted keys."""
    from ray import tune

    reset_peak_rss()  # a reused trial actor: this trial's own peak memory
    base = config_from_dict(config["base"])
    params = {k: v for k, v in config.items() if k not in ("base", "shared", "stages")}
    trial_id = tune.get_context().get_trial_id()
    shared = RunLayout.of(base)
    cfg = trial_config(base, params, shared.tune_dir / TRIALS_SUBDIR / trial_id)
    layout = RunLayout.of(cfg)
    link_upstream(shared, layout, config["shared"])
    start = time.perf_counter()
    results = run_stages(config["stages"], cfg, show_progress=False, tune_trial=True,
                         must_be_complete=tuple(config["shared"]))
    summary_file = layout.path("prune" if "prune" in results else "train", "summary.json")
    if "prune" in results:
        rounds = sorted(layout.path("prune").glob("finetune_*/summary.json"),
                        key=lambda p: int(p.parent.name.rsplit("_", 1)[1]))
        summary_file = rounds[-1] if rounds else summary_file
    history = read_json(summary_file)["history"] if summary_file.is_file() else []
    last = history[-1] if history else {}
    metrics = {k: last[k] for k in ("val_mrr", "val_hits1") if k in last}
    metrics.update(cost_metrics(cfg, load_dataset(cfg)))
    metrics["trial_seconds"] = time.perf_counter() - start
    metrics[COMPLETE] = True  # (Tune's own `done` is also set on stopped trials)
    fault_point("tune.trial")
    tune.report(metrics)

"""Evaluation on Ray workers: each worker builds the trained model once, encodes and ranks an
equal slice of the queries, and returns its ranks; the driver only gathers them and computes
the metrics (it never builds the model, which for LLaVA-7B needs a GPU the driver's node
usually lacks)."""

from __future__ import annotations

import numpy as np
import torch

from elmm_ray.config import Config, config_from_dict, config_to_dict
from elmm_ray.data.dataset import load_dataset
from elmm_ray.data.kg import KnowledgeGraph
from elmm_ray.eval.evaluate import metrics_of, rank_shard, refresh_entity_cache, select_queries
from elmm_ray.faults import fault_point
from elmm_ray.layout import RunLayout
from elmm_ray.ray_session import init_ray
from elmm_ray.train.context import load_trained_context


def eval_workers(cfg: Config) -> int:
    """How many Ray workers rank the queries (0: in this process), from ``eval.workers``."""
    if cfg.eval.workers is not None:
        return cfg.eval.workers
    return cfg.train.num_workers if cfg.train.backend == "ray" else 0


def _rank_slice(config: dict, split: str, rank: int, world: int) -> dict:
    """One worker's share: the trained model, its slice of ``split``'s queries ranked."""
    cfg = config_from_dict(config)
    torch.set_num_threads(cfg.train.threads_per_worker)
    RunLayout.of(cfg).pull()  # a remote run directory: this node's mirror gets the model
    kg = load_dataset(cfg)
    ctx = load_trained_context(cfg, kg)
    model = ctx.model.eval()
    if cfg.train.use_gpu and torch.cuda.is_available():
        model.to("cuda")
    with torch.no_grad():
        refresh_entity_cache(model, ctx.collator, ctx.features, cfg.eval.batch_size)
        queries = select_queries(kg, split, cfg.eval.max_queries or 0)
        ranks, top1 = rank_shard(model, ctx.collator, ctx.features, kg, queries,
                                 cfg.eval.batch_size, (rank, world))
    fault_point("eval.rank")
    return {"rank": rank, "ranks": ranks, "top1": top1}


def evaluate_on_ray(cfg: Config, kg: KnowledgeGraph, split: str | None = None,
                    workers: int | None = None) -> dict:
    """Filtered ranking of the run's trained model on ``split`` by ``workers`` Ray workers
    (default :func:`eval_workers`), each with a training worker's resources."""
    import ray

    init_ray(cfg.ray)
    split = split or cfg.eval.split
    world = max(1, workers or eval_workers(cfg))
    task = ray.remote(_rank_slice).options(
        num_cpus=cfg.train.cpus_per_worker, num_gpus=1 if cfg.train.use_gpu else 0,
        max_retries=2, runtime_env={"env_vars": {"OMP_NUM_THREADS":
                                                 str(cfg.train.threads_per_worker)}})
    config = config_to_dict(cfg)
    parts = sorted(ray.get([task.remote(config, split, r, world) for r in range(world)]),
                   key=lambda p: p["rank"])
    queries = select_queries(kg, split, cfg.eval.max_queries or 0)
    ranks = np.concatenate([p["ranks"] for p in parts])[:len(queries)]
    top1 = np.concatenate([p["top1"] for p in parts])[:len(queries)]
    return metrics_of(kg, split, queries, ranks, top1, cfg.eval.hits_at)

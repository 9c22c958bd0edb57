"""Evaluation on Ray workers: each worker builds the trained model once, encodes its slice of
the entities (encoder entity modes; the slices are gathered into one table every worker ranks
against), ranks an equal slice of the queries and returns its ranks; the driver only gathers
and computes the metrics (it never builds the model, which for LLaVA-7B needs a GPU the
driver's node usually lacks)."""

from __future__ import annotations

import numpy as np
import torch

from elmm_ray.config import Config, config_from_dict, config_to_dict, min_workers
from elmm_ray.data.dataset import load_dataset
from elmm_ray.data.kg import KnowledgeGraph
from elmm_ray.eval.evaluate import (
    encode_all_entities,
    metrics_of,
    rank_shard,
    select_queries,
    shard_of,
)
from elmm_ray.faults import fault_point
from elmm_ray.layout import RunLayout
from elmm_ray.ray_session import init_ray
from elmm_ray.train.context import load_trained_context


def eval_workers(cfg: Config) -> int:
    """How many Ray workers rank the queries (0: in this process), from ``eval.workers``, else
    the training workers (the fewest of an elastic range: what the cluster surely gives)."""
    if cfg.eval.workers is not None:
        return cfg.eval.workers
    return min_workers(cfg.train) if cfg.train.backend == "ray" else 0


class _EvalWorker:
    """One evaluation worker: builds the trained model once, then encodes its slice of the
    entities (encoder entity modes) and ranks its slice of the queries."""

    def __init__(self, config: dict) -> None:
        self.cfg = cfg = config_from_dict(config)
        torch.set_num_threads(cfg.train.threads_per_worker)
        RunLayout.of(cfg).pull_inputs()  # a remote run directory: the model, on this node
        self.kg = load_dataset(cfg)
        self.ctx = load_trained_context(cfg, self.kg)
        self.model = self.ctx.model.eval()
        if cfg.train.use_gpu and torch.cuda.is_available():
            self.model.to("cuda")

    def encode_slice(self, rank: int, world: int) -> torch.Tensor | None:
        """Rank ``rank``'s contiguous slice of every entity's encoding, in the batches one
        process would encode (:func:`shard_of`), so the gathered table is bit for bit one
        process's (None: the model keeps a table, nothing to encode)."""
        if not self.model.encodes_entities:
            return None
        part = shard_of(self.model.num_entities, rank, world, self.cfg.eval.batch_size)
        with torch.no_grad():
            return encode_all_entities(self.model, self.ctx.collator, self.ctx.features,
                                       self.cfg.eval.batch_size,
                                       ids=torch.arange(part.start, part.stop))

    def rank_slice(self, table: torch.Tensor | None, split: str, rank: int, world: int) -> dict:
        """Rank this worker's slice of ``split``'s queries (``table``: every entity's encoding,
        gathered from all the workers' slices)."""
        if table is not None:
            self.model.set_entity_cache(table)
        with torch.no_grad():
            queries = select_queries(self.kg, split, self.cfg.eval.max_queries or 0)
            ranks, top1 = rank_shard(self.model, self.ctx.collator, self.ctx.features, self.kg,
                                     queries, self.cfg.eval.batch_size, (rank, world),
                                     pad_forwards=False)
        fault_point("eval.rank")
        return {"rank": rank, "ranks": ranks, "top1": top1}


def evaluate_on_ray(cfg: Config, kg: KnowledgeGraph, split: str | None = None,
                    workers: int | None = None) -> dict:
    """Filtered ranking of the run's trained model on ``split`` by ``workers`` Ray actors
    (default :func:`eval_workers`), each with a training worker's resources: in encoder
    entity modes each encodes a slice of the entities and all rank against the gathered
    table (every entity encoded once), then each ranks a slice of the queries."""
    import ray

    init_ray(cfg.ray)
    split = split or cfg.eval.split
    world = max(1, workers or eval_workers(cfg))
    actor = ray.remote(_EvalWorker).options(
        num_cpus=cfg.train.cpus_per_worker, num_gpus=1 if cfg.train.use_gpu else 0,
        max_restarts=2, max_task_retries=2,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(cfg.train.threads_per_worker)}})
    config = config_to_dict(cfg)
    pool = [actor.remote(config) for _ in range(world)]
    try:
        slices = ray.get([w.encode_slice.remote(r, world) for r, w in enumerate(pool)])
        table = None if slices[0] is None else ray.put(torch.cat(slices))
        parts = sorted(ray.get([w.rank_slice.remote(table, split, r, world)
                                for r, w in enumerate(pool)]), key=lambda p: p["rank"])
    finally:
        for w in pool:
            ray.kill(w)
    queries = select_queries(kg, split, cfg.eval.max_queries or 0)
    ranks = np.concatenate([p["ranks"] for p in parts])[:len(queries)]
    top1 = np.concatenate([p["top1"] for p in parts])[:len(queries)]
    return metrics_of(kg, split, queries, ranks, top1, cfg.eval.hits_at)

"""The local backend of the training loop on a small synthetic KG: loss goes down, ranking
beats chance, and `elmm-ray eval` on the saved run reproduces the in-process figures."""

import json

import numpy as np
import pytest

from elmm_ray.cli import main
from elmm_ray.config import load_config
from elmm_ray.data.dataset import load_dataset
from elmm_ray.layout import RunLayout, absolute_paths
from elmm_ray.stages import run_stages
from elmm_ray.stages.train import evaluate
from elmm_ray.train.context import load_trained_context
from tests.tiny import TINY as TINY_BASE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TINY = [*TINY_BASE, "train.epochs=6"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_session):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = absolute_paths(load_config("configs/demo.yaml", [f"run_dir={run_dir}", *TINY]))
    results = run_stages(["train"], cfg, show_progress=False)  # synth, pack (Ray Data), train
    assert list(results) == ["synth", "pack", "train"]
    kg = load_dataset(cfg)
    summary = json.loads(RunLayout.of(cfg).path("train", "summary.json").read_text())
    summary["metrics"] = evaluate(cfg, kg, load_trained_context(cfg, kg))
    return cfg, kg, summary


def test_loss_decreases_and_ranking_beats_chance(trained):
    cfg, kg, summary = trained
    losses = summary["losses"]
    k = max(1, len(losses) // 4)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    assert last < 0.8 * first, (first, last)
    overall = summary["metrics"]["overall"]
    # What a random ranking scores: each query ranks among the entities left by filtering.
    queries = kg.queries(cfg.eval.split)
    others = kg.filter_index().num_answers(queries[:, 0], queries[:, 1]) - 1
    candidates = kg.num_entities - others
    chance_hits1 = float(np.mean(1.0 / candidates))
    chance_mrr = float(np.mean([np.mean(1.0 / np.arange(1, c + 1)) for c in candidates]))
    assert overall["hits@1"] > chance_hits1
    assert overall["mrr"] > 2 * chance_mrr, (overall["mrr"], chance_mrr)
    history = summary["history"]
    assert len(history) == cfg.train.epochs  # validated once per epoch
    lines = (RunLayout.of(cfg).path("train", "metrics.jsonl")).read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [h["step"] for h in history]


def test_eval_cli_reproduces_training_figures(trained, capsys):
    cfg, _, summary = trained
    assert main(["eval", cfg.run_dir]) == 0
    out = capsys.readouterr().out
    assert "MRR" in out and "Hits@1" in out
    written = json.loads(
        RunLayout.of(cfg).metrics_file("test").read_text())
    for key in ("mrr", "hits@1", "hits@3", "hits@10"):
        assert written["overall"][key] == pytest.approx(summary["metrics"]["overall"][key],
                                                        abs=1e-6)
    assert f"{summary['metrics']['overall']['mrr']:.4f}" in out


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_evaluation_equals_one_process(trained, world):
    """Validation split across ranks (each whole batches of the one-process order, results
    padded to equal size; ranks gathered) gives the metrics of one process ranking every
    query, exactly: every query goes through the same batches. The ranks run here one after
    another: the first pass records each rank's slice, the second hands every rank all."""
    import torch

    from elmm_ray.eval.evaluate import evaluate_model

    cfg, kg, _ = trained
    ctx = load_trained_context(cfg, kg)
    args = (ctx.model, ctx.collator, ctx.features, kg)
    kwargs = dict(split="valid", batch_size=7, ks=cfg.eval.hits_at)
    whole = evaluate_model(*args, **kwargs)
    slices: dict[int, torch.Tensor] = {}

    def record(rank):
        def gather(local):
            slices[rank] = local
            return torch.cat([local] * world)
        return gather

    for rank in range(world):
        evaluate_model(*args, **kwargs, shard=(rank, world), all_gather=record(rank))
    assert len({tuple(t.shape) for t in slices.values()}) == 1  # equal slices (padded)
    every = torch.cat([slices[r] for r in range(world)])
    for rank in range(world):
        sharded = evaluate_model(*args, **kwargs, shard=(rank, world),
                                 all_gather=lambda local: every)
        assert sharded["num_queries"] == whole["num_queries"]
        for key, value in whole["overall"].items():
            assert sharded["overall"][key] == pytest.approx(value, abs=1e-9), key
        assert sharded["head"] == pytest.approx(whole["head"])

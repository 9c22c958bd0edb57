"""Filtered ranking, metrics, type-violation rate and the text/JSON reports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from elmm_ray.data.kg import KnowledgeGraph
from elmm_ray.eval import (
    evaluate_ranking,
    filtered_ranks,
    filtered_ranks_and_top1,
    format_metrics_table,
    rank_queries,
    rank_with_vectors,
    ranking_metrics,
    write_metrics_json,
)


def make_kg(num_entities: int, num_relations: int, train, valid=(), test=()) -> KnowledgeGraph:
    def arr(rows) -> np.ndarray:
        return np.asarray(rows, dtype=np.int64).reshape(-1, 3)

    return KnowledgeGraph(
        name="tiny",
        entities=[f"e{i}" for i in range(num_entities)],
        relations=[f"r{i}" for i in range(num_relations)],
        entity_names=[f"e{i}" for i in range(num_entities)],
        entity_descriptions=[""] * num_entities,
        relation_texts=[f"r{i}" for i in range(num_relations)],
        triples={"train": arr(train), "valid": arr(valid), "test": arr(test)},
        entity_images=[[] for _ in range(num_entities)],
        has_text=np.ones(num_entities, dtype=bool),
    )


def random_kg(seed: int, num_entities: int = 40, num_relations: int = 3) -> KnowledgeGraph:
    rng = np.random.default_rng(seed)

    def triples(n: int) -> np.ndarray:
        return np.stack([rng.integers(0, num_entities, n), rng.integers(0, num_relations, n),
                         rng.integers(0, num_entities, n)], axis=1)

    return make_kg(num_entities, num_relations, triples(150), triples(20), triples(25))


NO_FILTER = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))


# ---------------------------------------------------------------------------- filtered_ranks


def test_single_query_rank() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.9]])
    assert filtered_ranks(scores, np.array([2]), *NO_FILTER).tolist() == [3.0]
    assert filtered_ranks(scores, np.array([3]), *NO_FILTER).tolist() == [1.0]
    assert filtered_ranks(scores, np.array([0]), *NO_FILTER).tolist() == [4.0]


def test_ties_count_at_their_mean_rank() -> None:
    # Target tied with two others, nothing higher: 1 + 0 + 2 / 2.
    scores = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert filtered_ranks(scores, np.array([0]), *NO_FILTER).tolist() == [2.0]
    # One higher, one tie: 1 + 1 + 1 / 2.
    scores = torch.tensor([[2.0, 1.0, 1.0, 0.0]])
    assert filtered_ranks(scores, np.array([1]), *NO_FILTER).tolist() == [2.5]
    # All equal: the mean of ranks 1..E.
    assert filtered_ranks(torch.zeros(1, 5), np.array([3]), *NO_FILTER).tolist() == [3.0]


def test_filtering_another_answer_improves_rank_by_one() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.9]])
    unfiltered = filtered_ranks(scores, np.array([2]), *NO_FILTER).item()
    filtered = filtered_ranks(scores, np.array([2]), np.array([0]), np.array([3])).item()
    assert filtered == unfiltered - 1 == 2.0
    # Filtering a lower-scoring answer changes nothing.
    assert filtered_ranks(scores, np.array([2]), np.array([0]), np.array([0])).item() == 3.0
    assert torch.equal(scores, torch.tensor([[0.1, 0.5, 0.3, 0.9]]))  # input left unchanged


def test_target_is_never_filtered() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.9], [0.4, 0.4, 0.2, 0.0]])
    rows, cols = np.array([0, 0, 0, 1, 1]), np.array([2, 3, 2, 0, 1])  # target 2 in filter
    ranks, top1 = filtered_ranks_and_top1(scores, np.array([2, 1]), rows, cols)
    assert ranks.tolist() == [2.0, 1.0]
    assert top1.tolist() == [1, 1]


def test_infinite_and_nan_targets_are_not_optimistic() -> None:
    inf = float("inf")
    scores = torch.tensor([[-inf, -inf, -inf, 1.0, 0.0]])
    # Target 0 at -inf; entity 1 (filtered) does not count; entity 2 ties; 3 and 4 are higher.
    assert filtered_ranks(scores, np.array([0]), np.array([0]), np.array([1])).item() == 3.5
    scores = torch.tensor([[float("nan"), 1.0, 0.0, 2.0]])
    assert filtered_ranks(scores, np.array([0]), np.array([0]), np.array([3])).item() == 3.0


def test_head_queries_are_filtered_with_head_answers() -> None:
    # (0, r, 1) and (2, r, 1): heads of (?, r, 1) are {0, 2}; tails of (0, r, ?) are {1, 3}.
    kg = make_kg(4, 1, train=[(0, 0, 1), (2, 0, 1), (0, 0, 3)])
    queries = kg.queries("train")
    head_query = queries[(queries[:, 1] == 1) & (queries[:, 0] == 1) & (queries[:, 2] == 0)]
    assert head_query.tolist() == [[1, 1, 0]]
    scores = torch.tensor([[0.5, 0.8, 0.9, 0.7]])

    def score_fn(entities: torch.Tensor, qrels: torch.Tensor) -> torch.Tensor:
        return scores.expand(len(entities), -1)

    result = rank_queries(score_fn, head_query, kg.filter_index(), batch_size=4)
    assert result.ranks.tolist() == [3.0]  # e2 filtered, e1 and e3 still above
    assert result.top1.tolist() == [1]
    tail_rows, tail_cols = kg.filter_index().mask_pairs(np.array([0]), np.array([0]))
    assert sorted(tail_cols.tolist()) == [1, 3]


def _reference_ranks(scores: np.ndarray, answers: np.ndarray, known: set[tuple[int, int]]):
    ranks, top1 = [], []
    for i in range(scores.shape[0]):
        target = scores[i, answers[i]]
        candidates = [j for j in range(scores.shape[1])
                      if j == answers[i] or (i, j) not in known]
        higher = sum(1 for j in candidates if scores[i, j] > target)
        ties = sum(1 for j in candidates if scores[i, j] == target and j != answers[i])
        ranks.append(1 + higher + ties / 2)
        best = max(scores[i, j] for j in candidates)
        top1.append(min(j for j in candidates if scores[i, j] == best))
    return ranks, top1


def test_matches_python_loop_with_ties() -> None:
    rng = np.random.default_rng(3)
    batch, num_entities = 30, 17
    scores = rng.integers(0, 4, size=(batch, num_entities)).astype(np.float32)
    answers = rng.integers(0, num_entities, size=batch)
    rows = rng.integers(0, batch, size=120)
    cols = rng.integers(0, num_entities, size=120)  # duplicates and targets included
    ranks, top1 = filtered_ranks_and_top1(torch.from_numpy(scores), answers, rows, cols)
    ref_ranks, ref_top1 = _reference_ranks(scores, answers, set(zip(rows.tolist(),
                                                                     cols.tolist())))
    assert ranks.tolist() == ref_ranks
    assert top1.tolist() == ref_top1


def test_rank_queries_equals_rank_with_vectors() -> None:
    kg = random_kg(0)
    gen = torch.Generator().manual_seed(0)
    # Integer-valued vectors: exact dot products, so ties are identical in both paths.
    entity_vectors = torch.randint(-2, 3, (kg.num_entities, 6), generator=gen).float()
    relation_vectors = torch.randint(-2, 3, (2 * kg.num_relations, 6), generator=gen).float()
    queries = kg.queries("test")
    query_vectors = entity_vectors[queries[:, 0]] + relation_vectors[queries[:, 1]]

    def score_fn(entities: torch.Tensor, qrels: torch.Tensor) -> torch.Tensor:
        return (entity_vectors[entities] + relation_vectors[qrels]) @ entity_vectors.T

    filt = kg.filter_index()
    by_fn = rank_queries(score_fn, queries, filt, batch_size=11)
    by_vectors = rank_with_vectors(query_vectors, entity_vectors, queries, filt, batch_size=7)
    np.testing.assert_array_equal(by_fn.ranks, by_vectors.ranks)
    np.testing.assert_array_equal(by_fn.top1, by_vectors.top1)
    assert (by_fn.ranks % 0.5 == 0).all() and (by_fn.ranks >= 1).all()
    # Against the loop reference on the same scores.
    all_scores = score_fn(torch.from_numpy(queries[:, 0]), torch.from_numpy(queries[:, 1]))
    rows, cols = filt.mask_pairs(queries[:, 0], queries[:, 1])
    ref_ranks, ref_top1 = _reference_ranks(all_scores.numpy(), queries[:, 2],
                                           set(zip(rows.tolist(), cols.tolist())))
    assert by_vectors.ranks.tolist() == ref_ranks
    assert by_vectors.top1.tolist() == ref_top1


def test_cosine_and_temperature_do_not_change_ranks_of_unit_vectors() -> None:
    kg = random_kg(1)
    gen = torch.Generator().manual_seed(1)
    entity_vectors = torch.nn.functional.normalize(torch.randn(kg.num_entities, 5, generator=gen),
                                                   dim=-1)
    queries = kg.queries("test")
    query_vectors = torch.randn(len(queries), 5, generator=gen)
    plain = rank_with_vectors(query_vectors, entity_vectors, queries, kg.filter_index())
    cosine = rank_with_vectors(query_vectors, entity_vectors * 3.0, queries, kg.filter_index(),
                               cosine=True, temperature=0.05)
    np.testing.assert_array_equal(plain.ranks, cosine.ranks)


# ---------------------------------------------------------------------------- metrics


def test_ranking_metrics_from_known_ranks() -> None:
    metrics = ranking_metrics(np.array([1.0, 2.0, 4.0, 20.0]))
    assert metrics["count"] == 4
    assert metrics["mrr"] == pytest.approx((1 + 0.5 + 0.25 + 0.05) / 4)
    assert metrics["mr"] == pytest.approx(6.75)
    assert (metrics["hits@1"], metrics["hits@3"], metrics["hits@10"]) == (0.25, 0.5, 0.75)
    assert ranking_metrics(np.array([1.5]), ks=(1, 2))["hits@1"] == 0.0
    assert math.isnan(ranking_metrics(np.array([]))["mrr"])


def test_type_violation_and_breakdown() -> None:
    # Tails of r0: {1}; heads of r0: {0, 2}; tails of r1: {3}; heads of r1: {0, 4}.
    train = np.array([(0, 0, 1), (2, 0, 1), (0, 1, 3), (4, 1, 3)])
    num_relations = 2
    queries = np.array([
        (0, 0, 1),  # tail r0, predicts 1: allowed
        (2, 0, 1),  # tail r0, predicts 3: never a tail of r0 -> violation
        (1, 2, 0),  # head r0, predicts 2: allowed
        (3, 3, 0),  # head r1, predicts 2: never a head of r1 -> violation
        (3, 3, 4),  # head r1, predicts 4: allowed
    ])
    top1 = np.array([1, 3, 2, 2, 4])
    ranks = np.array([1.0, 2.0, 1.0, 4.0, 1.0])
    metrics = evaluate_ranking(ranks, top1, queries, num_relations, ["1-N", "N-N"], train)
    assert metrics["overall"]["type_violation"] == pytest.approx(2 / 5)
    assert metrics["tail"]["type_violation"] == pytest.approx(1 / 2)
    assert metrics["head"]["type_violation"] == pytest.approx(1 / 3)
    assert metrics["tail"]["count"] == 2 and metrics["head"]["count"] == 3
    assert metrics["tail"]["mrr"] == pytest.approx(0.75)
    assert set(metrics["categories"]) == {"1-N", "N-N"}
    assert metrics["categories"]["1-N"]["both"]["count"] == 3
    assert metrics["categories"]["N-N"]["head"]["count"] == 2
    assert metrics["categories"]["N-N"]["tail"]["count"] == 0
    assert metrics["categories"]["N-N"]["head"]["type_violation"] == pytest.approx(0.5)
    assert metrics["categories"]["N-N"]["head"]["mr"] == pytest.approx(2.5)


def test_breakdown_by_relation() -> None:
    """``relations``: per relation and direction, the same figures as the ranks of exactly
    those queries; a direction or relation without queries is left out; the list stays out
    of the trackers' metrics (numeric leaves of nested dicts only)."""
    from elmm_ray.tracking import numbers

    train = np.array([(0, 0, 1), (2, 0, 1), (0, 1, 3), (4, 1, 3)])
    queries = np.array([(0, 0, 1), (2, 0, 1), (1, 3, 0), (3, 4, 0), (3, 4, 4)])  # 3 relations
    ranks = np.array([1.0, 2.0, 1.0, 4.0, 1.0])
    top1 = np.array([1, 3, 2, 2, 4])
    metrics = evaluate_ranking(ranks, top1, queries, 3, ["1-N", "N-N", "1-1"], train,
                               relation_names=["has a", "has b", "unasked"])
    by_name = {e["relation"]: e for e in metrics["relations"]}
    assert list(by_name) == ["has a", "has b"] and by_name["has b"]["id"] == 1
    assert by_name["has a"]["tail"]["count"] == 2 and by_name["has a"]["tail"]["hits@1"] == 0.5
    assert by_name["has a"]["tail"]["mrr"] == pytest.approx(0.75)
    assert by_name["has a"]["head"]["count"] == 1 and by_name["has a"]["head"]["hits@1"] == 1.0
    assert "tail" not in by_name["has b"]
    assert by_name["has b"]["head"]["mr"] == pytest.approx(2.5)
    assert by_name["has b"]["head"]["type_violation"] == pytest.approx(0.5)
    assert not any("relations" in key for key in numbers(metrics))
    assert "relations" not in evaluate_ranking(ranks, top1, queries, 3, ["1-N"] * 3, train)
    with pytest.raises(ValueError, match="2 relation names for 3 relations"):
        evaluate_ranking(ranks, top1, queries, 3, ["1-N"] * 3, train, relation_names=["a", "b"])


def test_reports(tmp_path) -> None:
    train = np.array([(0, 0, 1), (2, 0, 1)])
    metrics = evaluate_ranking(np.array([1.0, 3.0]), np.array([1, 0]),
                               np.array([(0, 0, 1), (1, 1, 2)]), 1, ["N-1"], train)
    table = format_metrics_table(metrics)
    lines = table.splitlines()
    assert lines[0].split() == ["subset", "queries", "MRR", "MR", "Hits@1", "Hits@3", "Hits@10",
                                "type-viol"]
    assert [line.split()[0] for line in lines[2:5]] == ["overall", "tail", "head"]
    assert "N-1 both" in table
    assert len({len(line) for line in lines}) == 1  # aligned
    metrics["overall"]["extra"] = float("nan")
    path = write_metrics_json(metrics, tmp_path / "sub" / "metrics.json")
    loaded = json.loads(path.read_text())
    assert loaded["overall"]["mr"] == 2.0 and loaded["overall"]["extra"] is None

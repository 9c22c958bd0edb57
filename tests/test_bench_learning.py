"""bench/bench_learning.py --train-relations: a relation ablation trains on fewer triples
but ranks with the whole filter."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_ranking import make_kg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_learning import train_only  # noqa: E402


def test_train_only_keeps_the_relations_and_the_whole_filter():
    kg = make_kg(6, 3, train=[(0, 0, 1), (0, 1, 4), (2, 2, 3), (1, 0, 2)], test=[(0, 1, 5)])
    train_only(kg, ["r0"])
    assert kg.triples["train"].tolist() == [[0, 0, 1], [1, 0, 2]]
    assert kg.triples["test"].tolist() == [[0, 1, 5]]
    # The test query (0, r1, ?) still has the dropped training answer 4 filtered.
    rows, cols = kg.filter_index().mask_pairs(np.array([0]), np.array([1]))
    assert sorted(np.asarray(cols).tolist()) == [4, 5]
    # Training's own filter is built from what it trains on.
    rows, cols = kg.filter_index(("train",)).mask_pairs(np.array([0]), np.array([1]))
    assert len(cols) == 0


def test_train_only_names_an_unknown_relation():
    kg = make_kg(3, 2, train=[(0, 0, 1)])
    with pytest.raises(SystemExit, match=r"\['has colour'\] not among .*\['r0', 'r1'\]"):
        train_only(kg, ["has colour"])
    assert len(kg.triples["train"]) == 1

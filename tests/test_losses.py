"""L_task (contrastive, self-denoising) and L_knowledge."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from elmm_ray.losses import (
    combined_loss,
    contrastive_loss,
    hard_negatives,
    knowledge_loss,
    pairs_to_mask,
    sample_negatives,
)

NUM_ENTITIES, WIDTH, TEMPERATURE = 12, 8, 0.1


def make_inputs(batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    queries = F.normalize(torch.randn(batch, WIDTH, generator=gen), dim=-1)
    table = torch.randn(NUM_ENTITIES, WIDTH, generator=gen)
    return queries, table


def loss_of(table: torch.Tensor, queries: torch.Tensor, **kwargs) -> torch.Tensor:
    kwargs.setdefault("temperature", TEMPERATURE)
    return contrastive_loss(queries, table, **kwargs)


def perturbed(table: torch.Tensor, entity: int) -> torch.Tensor:
    table = table.clone()
    table[entity] = torch.randn(WIDTH, generator=torch.Generator().manual_seed(99)) * 3
    return table


def reference_loss(queries, table, answers, query_entities, negatives, known, use_in_batch=True,
                   self_negative=True) -> float:
    """Plain loop: each distinct valid negative entity once."""
    entity_vectors = F.normalize(table, dim=-1)
    total = 0.0
    for i in range(len(answers)):
        candidates = list(negatives[i].tolist()) if negatives is not None else []
        if use_in_batch:
            candidates += answers.tolist()
        if self_negative:
            candidates.append(int(query_entities[i]))
        negative_set = {c for c in candidates
                        if c != int(answers[i]) and (i, c) not in known}
        ids = [int(answers[i])] + sorted(negative_set)
        logits = (entity_vectors[ids] @ queries[i]) / TEMPERATURE
        total += float(-(logits[0] - torch.logsumexp(logits, 0)))
    return total / len(answers)


def test_matches_reference_with_duplicates_and_known_answers() -> None:
    queries, table = make_inputs(batch=4, seed=1)
    answers = torch.tensor([2, 2, 5, 7])  # rows 0 and 1 share an answer
    query_entities = torch.tensor([7, 3, 5, 1])  # row 2: self-loop; row 0: another row's answer
    negatives = torch.tensor([[2, 9, 9, 4], [0, 1, 3, 3], [5, 6, 8, 2], [7, 0, 11, 10]])
    known = {(0, 2), (0, 9), (1, 2), (2, 5), (2, 6), (3, 7), (3, 1)}
    rows, cols = (np.array(x) for x in zip(*sorted(known)))
    loss = loss_of(table, queries, answers=answers, query_entities=query_entities,
                   negatives=negatives, known_answers=(rows, cols))
    expected = reference_loss(queries, table, answers, query_entities, negatives, known)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # The dense mask form gives the same loss.
    mask = pairs_to_mask(rows, cols, 4, NUM_ENTITIES)
    dense = loss_of(table, queries, answers=answers, query_entities=query_entities,
                    negatives=negatives, known_answers=mask)
    assert dense.item() == pytest.approx(loss.item(), rel=1e-6)
    for use_in_batch, self_negative in [(False, True), (True, False), (False, False)]:
        got = loss_of(table, queries, answers=answers, query_entities=query_entities,
                      negatives=negatives, known_answers=(rows, cols), use_in_batch=use_in_batch,
                      self_negative=self_negative)
        want = reference_loss(queries, table, answers, query_entities, negatives, known,
                              use_in_batch, self_negative)
        assert got.item() == pytest.approx(want, rel=1e-5)


def test_other_known_answers_are_not_negatives() -> None:
    queries, table = make_inputs()
    answers, query_entities = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    negatives = torch.tensor([[9, 6], [6, 7], [7, 8]])  # 9 only in row 0
    known = (np.array([0, 0]), np.array([0, 9]))
    kwargs = dict(answers=answers, query_entities=query_entities, negatives=negatives)
    base = loss_of(table, queries, known_answers=known, **kwargs)
    moved = loss_of(perturbed(table, 9), queries, known_answers=known, **kwargs)
    assert moved.item() == pytest.approx(base.item(), abs=1e-7)
    # Without the filter, entity 9 is a negative and moving it changes the loss.
    unfiltered = loss_of(table, queries, known_answers=None, **kwargs)
    moved_unfiltered = loss_of(perturbed(table, 9), queries, known_answers=None, **kwargs)
    assert moved_unfiltered.item() != pytest.approx(unfiltered.item(), abs=1e-4)


def test_query_entity_is_a_negative_unless_known() -> None:
    queries, table = make_inputs()
    answers, query_entities = torch.tensor([0, 1, 2]), torch.tensor([10, 4, 5])  # 10 only here
    kwargs = dict(answers=answers, query_entities=query_entities, negatives=None)
    base = loss_of(table, queries, **kwargs)
    assert loss_of(perturbed(table, 10), queries, **kwargs).item() != pytest.approx(
        base.item(), abs=1e-4)
    off = loss_of(table, queries, self_negative=False, **kwargs)
    assert loss_of(perturbed(table, 10), queries, self_negative=False, **kwargs).item() == (
        pytest.approx(off.item(), abs=1e-7))
    known = (np.array([0]), np.array([10]))
    filtered = loss_of(table, queries, known_answers=known, **kwargs)
    moved = loss_of(perturbed(table, 10), queries, known_answers=known, **kwargs)
    assert moved.item() == pytest.approx(filtered.item(), abs=1e-7)
    # Every query entity known: the same as no self-negatives at all.
    all_known = (np.array([0, 1, 2]), np.array([10, 4, 5]))
    assert loss_of(table, queries, known_answers=all_known, **kwargs).item() == pytest.approx(
        off.item(), abs=1e-6)


def test_in_batch_answer_equal_to_positive_is_not_a_negative() -> None:
    queries, table = make_inputs(batch=2)
    answers, query_entities = torch.tensor([3, 3]), torch.tensor([5, 6])
    loss = loss_of(table, queries, answers=answers, query_entities=query_entities,
                   use_in_batch=True, self_negative=False)
    # Every in-batch candidate is the positive itself: only the positive remains.
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


def test_gradient_flows_to_queries_and_table() -> None:
    queries, table = make_inputs()
    queries.requires_grad_(True)
    table.requires_grad_(True)
    negatives = sample_negatives(3, 4, NUM_ENTITIES, torch.Generator().manual_seed(0))
    loss = loss_of(table, queries, answers=torch.tensor([0, 1, 2]),
                   query_entities=torch.tensor([3, 4, 5]), negatives=negatives,
                   known_answers=(np.array([0]), np.array([3])))
    loss.backward()
    assert torch.isfinite(loss)
    assert queries.grad is not None and torch.isfinite(queries.grad).all()
    assert queries.grad.abs().sum() > 0
    assert table.grad is not None and torch.isfinite(table.grad).all()
    assert table.grad[[0, 1, 2]].abs().sum() > 0
    # A learnable temperature also gets a gradient.
    temperature = torch.tensor(0.2, requires_grad=True)
    contrastive_loss(queries.detach(), table.detach(), torch.tensor([0, 1, 2]),
                     torch.tensor([3, 4, 5]), temperature=temperature).backward()
    assert temperature.grad is not None and torch.isfinite(temperature.grad)


def test_finite_with_no_negatives_and_batch_of_one() -> None:
    queries, table = make_inputs(batch=1)
    answers, query_entities = torch.tensor([2]), torch.tensor([4])
    for negatives in (None, torch.zeros(1, 0, dtype=torch.long)):
        loss = loss_of(table, queries, answers=answers, query_entities=query_entities,
                       negatives=negatives)
        assert torch.isfinite(loss) and loss.item() > 0  # the head is the one negative
    only_positive = loss_of(table, queries, answers=answers, query_entities=query_entities,
                            known_answers=(np.array([0]), np.array([4])))
    assert only_positive.item() == pytest.approx(0.0, abs=1e-7)
    empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    scores = torch.randn(1, NUM_ENTITIES, requires_grad=True)
    knowledge = knowledge_loss(scores, *empty)
    knowledge.backward()
    assert knowledge.item() == 0.0 and torch.isfinite(scores.grad).all()


def test_sample_negatives_is_deterministic_and_in_range() -> None:
    first = sample_negatives(5, 7, NUM_ENTITIES, torch.Generator().manual_seed(3))
    second = sample_negatives(5, 7, NUM_ENTITIES, torch.Generator().manual_seed(3))
    assert first.shape == (5, 7) and first.dtype == torch.long
    assert torch.equal(first, second)
    assert first.min() >= 0 and first.max() < NUM_ENTITIES
    assert sample_negatives(2, 0, NUM_ENTITIES).shape == (2, 0)


def test_hard_negatives_skip_answers_and_known_answers() -> None:
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0, 1.0],
                           [1.0, 2.0, 3.0, 9.0, 8.0, 7.0]])
    answers = torch.tensor([0, 3])
    known = (np.array([0, 1]), np.array([2, 4]))  # row 0 knows 2, row 1 knows 4
    per_row = hard_negatives(scores, answers, known, 2, shared=False)
    assert per_row.tolist() == [[1, 3], [5, 2]]
    # Shared by the batch: each row's hardest first, rows taking turns, each entity once.
    shared = hard_negatives(scores, answers, known, 3, shared=True)
    assert shared.tolist() == [[1, 5, 3]]
    assert hard_negatives(scores, answers, known, 10, shared=True).shape == (1, 6)
    # A boolean known mask gives the same; scores are not modified.
    mask = pairs_to_mask(*known, 2, 6)
    assert torch.equal(hard_negatives(scores, answers, mask, 2, shared=False), per_row)
    assert scores[0, 0] == 9.0


def test_hard_negatives_never_pick_masked_entities() -> None:
    scores = torch.full((1, 4), float("-inf"))
    scores[0, 2] = 0.5
    assert hard_negatives(scores, torch.tensor([0]), None, 3, shared=True).tolist() == [[2]]


def test_knowledge_loss_by_hand() -> None:
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    loss = knowledge_loss(scores, np.array([0, 0]), np.array([1, 3]))
    log_partition = math.log(sum(math.exp(x) for x in (1.0, 2.0, 3.0, 4.0)))
    assert loss.item() == pytest.approx(log_partition - (2.0 + 4.0) / 2, rel=1e-6)
    loss.backward()
    probs = torch.softmax(scores.detach(), 1)[0]
    expected_grad = probs - torch.tensor([0.0, 0.5, 0.0, 0.5])
    assert torch.allclose(scores.grad[0], expected_grad, atol=1e-6)


def test_knowledge_loss_averages_rows_with_answers() -> None:
    scores = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    rows, cols = np.array([0, 2, 2, 2]), np.array([1, 0, 4, 5])
    log_probs = torch.log_softmax(scores, 1)
    expected = -(log_probs[0, 1] + log_probs[2, [0, 4, 5]].mean()) / 2  # row 1 has none
    assert knowledge_loss(scores, rows, cols).item() == pytest.approx(expected.item(), rel=1e-6)


def test_combined_loss() -> None:
    assert combined_loss(torch.tensor(2.0), torch.tensor(3.0), 0.5).item() == 3.5
    assert combined_loss(torch.tensor(2.0), torch.tensor(3.0), 0.0).item() == 2.0

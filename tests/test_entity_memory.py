"""Memory per entity on WN18-sized graphs (found by ``bench/bench_memory.py``): a model that
reads no images gets zeros for every entity without memory per entity, and the collator
tokenizes entity texts in chunks."""

from __future__ import annotations

import torch

from elmm_ray.data.image_features import FeatureBank


def test_a_bank_without_images_holds_one_zero_slot_for_every_entity():
    # Dense, 1,000,000 entities x 64 tokens x 64 wide would be 8 GB of fp16 zeros (WN18 with
    # the tiny preset took 1.3 GB of RSS before evaluation: bench/bench_memory.py).
    bank = FeatureBank.none(1_000_000, 0, 64, 64)
    assert bank.num_entities == 1_000_000 and bank.feature_shape == (64, 64)
    assert bank.features.untyped_storage().nbytes() == 64 * 64 * 2
    feats, mask = bank.features_for(torch.tensor([0, 999_999, 5]))
    assert feats.shape == (3, 1, 64, 64) and feats.dtype == torch.float32
    assert not feats.any() and not mask.any()
    dense = FeatureBank.empty(10, 2, 4, 8)  # the bank features_from_shards fills in place
    dense.features[3, 1] = 1.0
    assert dense.features_for(torch.tensor([3]))[0].sum() == 4 * 8


def test_entity_texts_tokenized_in_chunks_equal_one_call(monkeypatch):
    """The collator tokenizes entity texts in chunks (bounded memory on WN18); the ids are
    those of one call over every text."""
    from elmm_ray.data import collate
    from elmm_ray.models.build import build_tokenizer
    from tests.test_models import ENTITY_TEXTS, RELATION_TEXTS, tiny_config

    tokenizer = build_tokenizer(tiny_config(), ENTITY_TEXTS + RELATION_TEXTS)
    texts = ENTITY_TEXTS * 3
    whole = [row[:5] for row in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    monkeypatch.setattr(collate, "TOKENIZE_CHUNK", 4)
    assert collate._tokenize(tokenizer, texts, 5) == whole
    assert collate._tokenize(tokenizer, [], 5) == []


def test_ranking_batches_stay_within_the_score_budget():
    from elmm_ray.eval.evaluate import RANK_BATCH, SCORE_BUDGET, ranking_batch

    assert ranking_batch(14_541) == RANK_BATCH  # FB15k-237: 1,024 queries at once
    assert ranking_batch(40_943) == 409 and 409 * 40_943 <= SCORE_BUDGET  # WN18
    assert ranking_batch(10**9) == 1 and ranking_batch(0) == RANK_BATCH


def test_shards_are_whole_batches_of_the_one_process_order():
    """Every item in exactly one shard, in order; each shard's batches are batches of one
    process (starts at multiples of the batch size); the ranks run equally many forwards
    (real + dummy) and gather equally many rows."""
    import pytest

    from elmm_ray.eval.evaluate import aligned_ranking_batch, pad_rows, shard_of

    for total in (0, 1, 7, 48, 50, 97):
        for world in (1, 2, 3, 5):
            for batch in (1, 4, 16, 64):
                shards = [shard_of(total, r, world, batch) for r in range(world)]
                assert [i for s in shards for i in range(s.start, s.stop)] == list(range(total))
                assert all(s.start % batch == 0 or s.start == total for s in shards)
                forwards = {-(-(s.stop - s.start) // batch) + s.pad_batches for s in shards}
                assert len(forwards) == 1 and len({s.rows for s in shards}) == 1
                assert all(s.rows >= s.stop - s.start for s in shards)
    assert shard_of(48, 1, 2, 16) == shard_of(48, 1, 2, 16)
    assert (shard_of(48, 1, 2, 16).start, shard_of(48, 1, 2, 16).pad_batches) == (32, 1)
    with pytest.raises(ValueError, match="no shard"):
        shard_of(10, 2, 2, 4)
    assert pad_rows(torch.ones(2, 3), 4).tolist() == [[1.0] * 3] * 2 + [[0.0] * 3] * 2
    assert aligned_ranking_batch(14_541, 64) == 64  # within the budget: the encoding batch
    assert aligned_ranking_batch(40_943, 512) == 256  # 409 allowed: the largest divisor

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

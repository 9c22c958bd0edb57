"""Fast tests of the model side: backbone, tokenizer, MVTC, ELMM, collator, LoRA, builders."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from elmm_ray.config import Config  # noqa: E402
from elmm_ray.data.collate import QueryCollator  # noqa: E402
from elmm_ray.models.backbone import (  # noqa: E402
    CLIP_MEAN,
    CLIP_STD,
    BackboneLoadError,
    build_tiny_llava,
    encode_images,
    image_feature_shape,
    load_backbone,
    preprocess_images,
    vision_tower_of,
)
from elmm_ray.models.build import build_elmm, build_tokenizer  # noqa: E402
from elmm_ray.models.lora import (  # noqa: E402
    CheckpointMismatchError,
    apply_lora,
    load_trainable,
    lora_layers,
    merge_lora,
    save_trainable,
)
from elmm_ray.models.mvtc import MVTC, CrossAttention, masked_attention  # noqa: E402
from elmm_ray.models.tokenizer import (  # noqa: E402
    INVERSE_TOKEN,
    READOUT_TOKEN,
    SPECIAL_TOKENS,
    load_tokenizer,
    prepare_tokenizer,
    train_tokenizer,
)

ENTITY_TEXTS = [
    "paris , capital and largest city of france",
    "france , country in western europe",
    "the eiffel tower , wrought iron lattice tower in paris",
    "drama , film genre",
    "casablanca , 1942 american romantic drama film",
    "berlin , capital of germany",
]
RELATION_TEXTS = ["located in", "genre", "capital of"]
NUM_RELATIONS = len(RELATION_TEXTS)
LORA_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)$"


def tiny_config(**model_overrides) -> Config:
    cfg = Config()
    sizes = dict(
        vision_hidden=32,
        vision_layers=2,
        vision_heads=4,
        image_size=32,
        patch_size=8,
        llm_hidden=32,
        llm_layers=2,
        llm_heads=4,
        llm_kv_heads=2,
        llm_intermediate=64,
        vocab_size=200,
        max_text_tokens=12,
    )
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, **{**sizes, **model_overrides}),
        mvtc=dataclasses.replace(cfg.mvtc, n_visual=4, n_text=4, heads=4))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(tiny_config(), ENTITY_TEXTS + RELATION_TEXTS)


@pytest.fixture(scope="module")
def collator(tokenizer):
    return QueryCollator(tokenizer, ENTITY_TEXTS, RELATION_TEXTS, NUM_RELATIONS, 12)


def make_model(tokenizer, **overrides):
    cfg = tiny_config(**overrides)
    return build_elmm(cfg, num_entities=len(ENTITY_TEXTS), tokenizer=tokenizer).eval()


def random_features(batch: int, images: int, model, seed: int = 0) -> torch.Tensor:
    tokens, width = image_feature_shape(model.backbone)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, images, tokens, width, generator=generator).half()


# --- backbone -------------------------------------------------------------------------


def test_preprocess_converts_every_mode_and_crops_the_centre():
    size = 32
    rgb = Image.new("RGB", (80, 40), (255, 255, 255))
    rgb.paste((0, 0, 0), (0, 0, 10, 40))  # a black strip the centre crop must cut away
    palette = Image.new("P", (30, 50), 3)
    palette.info["transparency"] = 3
    images = [
        rgb,
        Image.new("CMYK", (40, 40), (0, 0, 0, 0)),
        Image.new("LA", (33, 47), (10, 0)),
        palette,
        Image.new("L", (50, 50), 255),
        Image.new("RGBA", (20, 64), (0, 0, 0, 0)),
        Image.fromarray(np.full((20, 20), 4000, dtype=np.uint16)),
    ]
    pixels = preprocess_images(images, size)
    assert pixels.shape == (len(images), 3, size, size) and pixels.dtype == torch.float32
    assert torch.isfinite(pixels).all()
    white = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    # rgb (after crop), CMYK 0 ink, transparent LA / P / RGBA on white, white L
    for index in (0, 1, 2, 3, 4, 5):
        assert torch.allclose(pixels[index].mean(dim=(1, 2)), white, atol=1e-4), index
    assert preprocess_images([], size).shape == (0, 3, size, size)


def test_encode_images_matches_the_vision_tower_and_pools():
    torch.manual_seed(0)
    llava = build_tiny_llava(
        vision_hidden=32,
        vision_layers=3,
        vision_heads=4,
        image_size=32,
        patch_size=8,
        llm_hidden=32,
        llm_layers=1,
        llm_heads=4,
        llm_kv_heads=2,
        llm_intermediate=64,
        vocab_size=50,
        image_token_id=4,
        pad_token_id=0,
    )
    tower = vision_tower_of(llava)
    pixels = torch.randn(3, 3, 32, 32)
    features = encode_images(tower, pixels)
    assert features.shape == (3, 16, 32) and features.dtype == torch.float16
    assert not features.requires_grad
    with torch.no_grad():
        manual = tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert torch.allclose(features.float(), manual.half().float())
    pooled = encode_images(tower, pixels, pool=2)
    assert pooled.shape == (3, 4, 32) and pooled.dtype == torch.float16
    grid = manual.reshape(3, 4, 4, 32)
    top_left = grid[:, :2, :2].mean(dim=(1, 2))
    assert torch.allclose(pooled[:, 0].float(), top_left, atol=2e-3)
    assert encode_images(tower, pixels, pool=8).shape == (3, 1, 32)
    assert encode_images(tower, pixels[:0], pool=2).shape == (0, 4, 32)
    with torch.no_grad():
        last = tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
    assert torch.allclose(encode_images(tower, pixels, layer=-1).float(), last.half().float())


def test_save_pretrained_then_load_backbone_gives_identical_outputs(tmp_path):
    llava = build_tiny_llava(
        vision_hidden=32,
        vision_layers=2,
        vision_heads=4,
        image_size=32,
        patch_size=8,
        llm_hidden=32,
        llm_layers=2,
        llm_heads=4,
        llm_kv_heads=2,
        llm_intermediate=64,
        vocab_size=50,
        image_token_id=4,
        pad_token_id=0,
        seed=3,
    )
    llava.save_pretrained(tmp_path / "llava")
    loaded = load_backbone(tmp_path / "llava", "float32")
    input_ids = torch.tensor([[1, 9] + [4] * 16 + [7, 8]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = llava(input_ids=input_ids, pixel_values=pixels).logits
        actual = loaded(input_ids=input_ids, pixel_values=pixels).logits
    assert torch.equal(expected, actual)


def test_load_backbone_errors_name_the_path_and_the_fix(tmp_path, monkeypatch):
    import huggingface_hub.constants

    with pytest.raises(BackboneLoadError, match="does not exist"):
        load_backbone(tmp_path / "missing" / "dir")
    with pytest.raises(BackboneLoadError, match="no config.json"):
        load_backbone(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(BackboneLoadError, match="(?s)no-such-org/no-such-llava.*hf download"):
        load_backbone("no-such-org/no-such-llava")


# --- tokenizer ------------------------------------------------------------------------


def test_tokenizer_is_deterministic_and_round_trips(tmp_path, tokenizer):
    again = train_tokenizer(ENTITY_TEXTS + RELATION_TEXTS, 200)
    assert again.get_vocab() == tokenizer.get_vocab()
    for token in SPECIAL_TOKENS:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(7))
    text = "The Eiffel Tower <readout> in Paris <inv>"
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.pad_token_id == tokenizer.pad_token_id == 0
    assert prepare_tokenizer(loaded) == 0


def test_prepare_tokenizer_adds_missing_prompt_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    checkpoint_like = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    assert prepare_tokenizer(checkpoint_like) == 4  # <image>, <readout>, <inv>, <pad>
    assert prepare_tokenizer(checkpoint_like) == 0
    ids = checkpoint_like("hello <readout> <inv>", add_special_tokens=False)["input_ids"]
    assert ids[0] == 3 and len(ids) == 3
    assert checkpoint_like.pad_token_id is not None


# --- MVTC ------------------------------------------------------------------------------


def make_mvtc(n_visual: int = 4, n_text: int = 3) -> MVTC:
    torch.manual_seed(0)
    mvtc = MVTC(feature_dim=16, text_dim=24, n_visual=n_visual, n_text=n_text, heads=4, dim=32)
    # Random last layers: at init the residual MLPs are identities, which hides bugs.
    for module in mvtc.modules():
        if hasattr(module, "down"):
            torch.nn.init.normal_(module.down.weight, std=0.1)
    return mvtc.eval()


def patches(images: list[int], max_images: int, tokens: int = 5, seed: int = 0):
    """Features (B, max_images * tokens, 16) and mask for entities with ``images`` each."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(len(images), max_images, tokens, 16, generator=generator)
    image_mask = torch.arange(max_images)[None, :] < torch.tensor(images)[:, None]
    patch_mask = image_mask[:, :, None].expand(-1, -1, tokens).reshape(len(images), -1)
    return features.reshape(len(images), -1, 16), patch_mask


def test_mvtc_shapes_and_masks_for_0_1_and_10_images():
    mvtc = make_mvtc()
    tokens, patch_mask = patches([0, 1, 10], max_images=10)
    text = torch.randn(3, 6, 24)
    text_mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3, [False] * 6])
    out, mask = mvtc(tokens, patch_mask, text, text_mask)
    assert out.shape == (3, 7, 16) and mask.shape == (3, 7)
    assert torch.isfinite(out).all()
    assert mask.tolist() == [[False] * 7, [True] * 7, [True] * 7]
    assert torch.count_nonzero(out[0]) == 0
    no_patches, empty_mask = mvtc(tokens[:, :0], patch_mask[:, :0], text, text_mask)
    assert no_patches.shape == (3, 7, 16) and not empty_mask.any()
    assert torch.count_nonzero(no_patches) == 0


def test_mvtc_ignores_padding_images_and_their_content():
    mvtc = make_mvtc()
    tokens, patch_mask = patches([2], max_images=2)
    padded = torch.cat([tokens, 1e3 * torch.randn(1, 8 * 5, 16)], dim=1)
    padded_mask = torch.cat([patch_mask, torch.zeros(1, 8 * 5, dtype=torch.bool)], dim=1)
    text = torch.randn(1, 4, 24)
    text_mask = torch.ones(1, 4, dtype=torch.bool)
    out, _ = mvtc(tokens, patch_mask, text, text_mask)
    out_padded, _ = mvtc(padded, padded_mask, text, text_mask)
    assert torch.allclose(out, out_padded, atol=1e-6)
    longer_text = torch.cat([text, torch.randn(1, 3, 24)], dim=1)
    longer_mask = torch.cat([text_mask, torch.zeros(1, 3, dtype=torch.bool)], dim=1)
    out_text_padded, _ = mvtc(tokens, patch_mask, longer_text, longer_mask)
    assert torch.allclose(out, out_text_padded, atol=1e-6)


def test_mvtc_view_counts_may_be_zero_and_gradients_stay_finite():
    tokens, patch_mask = patches([0, 3], max_images=3)
    text, text_mask = torch.randn(2, 4, 24), torch.ones(2, 4, dtype=torch.bool)
    for n_visual, n_text in ((0, 3), (4, 0), (0, 0)):
        out, mask = make_mvtc(n_visual, n_text)(tokens, patch_mask, text, text_mask)
        assert out.shape == (2, n_visual + n_text, 16) and mask.shape == out.shape[:2]
    mvtc = make_mvtc().train()
    out, _ = mvtc(tokens.requires_grad_(), patch_mask, text, text_mask)
    out.square().sum().backward()
    grads = [p.grad for p in mvtc.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert torch.count_nonzero(tokens.grad.view(2, 3, 5, 16)[0]) == 0


def test_pooling_attention_equals_attention_over_projected_keys():
    """The pooling attention never projects the patch tokens (it maps its queries into the
    feature space instead); it must equal the plain formula: attention over
    ``key_proj(context_norm(x))`` with the raw context as values, in value and gradient
    (the parameters' and the context's), padded and empty contexts included. float64, so
    the bound holds on any CPU (the two orders of the sums differ by ~1e-15)."""
    torch.manual_seed(0)
    attention = CrossAttention(32, 16, 4, raw_values=True).double()
    with torch.no_grad():  # non-trivial norms and biases (they start at 1 and 0)
        for param in attention.parameters():
            param.normal_(0.0, 0.5)
    tokens, mask = patches([0, 3, 1], max_images=3)
    queries = torch.randn(3, 6, 32, dtype=torch.float64)

    def reference(x: torch.Tensor) -> torch.Tensor:
        split = attention._split
        query = split(attention.query_proj(attention.query_norm(queries)))
        keys = split(attention.key_proj(attention.context_norm(x)))
        return masked_attention(query, keys, split(x), mask).transpose(1, 2).flatten(2)

    results = []
    for function in (reference, lambda x: attention(queries, x, mask)):
        attention.zero_grad()
        x = tokens.double().requires_grad_()
        out = function(x)
        out.mul(torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum() \
            .backward()
        results.append((out, x.grad, {n: p.grad.clone() for n, p in attention.named_parameters()}))
    (out_a, dx_a, grads_a), (out_b, dx_b, grads_b) = results
    assert out_a.abs().max() > 0.1 and out_b[0].abs().max() == 0  # entity 0 has no image
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=1e-10)
    torch.testing.assert_close(dx_b, dx_a, rtol=0, atol=1e-10)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=0, atol=1e-10, msg=name)
    assert grads_a["query_proj.weight"].abs().max() > 1e-3


def test_pooling_attention_under_zero3_with_every_weight_partitioned():
    """The folded pooling reads ``key_proj`` and ``context_norm`` weights outside their own
    forward; under ZeRO-3 with every weight partitioned (a 7B model's large weights are)
    and the model's own method calling MVTC twice before one backward, as the loop does,
    ``register_zero3_external_weights`` must make it see them whole: the same loss and, after
    one AdamW step, the same weights as plain torch. (Without the registration it fails:
    ``python -m tests.zero3_mvtc --unmarked`` prints the shape error the Ray ZeRO-3 tests
    hit.)"""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "tests.zero3_mvtc"], capture_output=True,
                          text=True, timeout=240, cwd=os.path.dirname(os.path.dirname(
                              os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["partitioned"] and result["marked"] == 8, result  # 2 pools x 4 weights
    assert result["loss"] == pytest.approx(result["plain_loss"], rel=1e-6), result
    assert result["max_weight_difference"] <= 1e-6, result


# --- ELMM + collator -------------------------------------------------------------------


def test_collator_builds_the_prompt_parts(tokenizer):
    collator = QueryCollator(tokenizer, ENTITY_TEXTS, RELATION_TEXTS, NUM_RELATIONS, 6)
    readout = tokenizer.convert_tokens_to_ids(READOUT_TOKEN)
    inverse = tokenizer.convert_tokens_to_ids(INVERSE_TOKEN)
    features = torch.zeros(2, 1, 16, 32)
    batch = collator(
        torch.tensor([2, 0]),
        torch.tensor([1, NUM_RELATIONS + 1]),
        features,
        torch.ones(2, 1, dtype=torch.bool),
    )
    prefix = batch["prefix_ids"][0][batch["prefix_mask"][0]].tolist()
    assert prefix[0] == tokenizer.bos_token_id and len(prefix) == 1 + 6  # truncated text
    tail = batch["suffix_ids"][0][batch["suffix_mask"][0]].tolist()
    head = batch["suffix_ids"][1][batch["suffix_mask"][1]].tolist()
    genre = tokenizer("genre", add_special_tokens=False)["input_ids"]
    assert tail == genre + [readout] and head == genre + [inverse, readout]
    with pytest.raises(ValueError, match="query relations"):
        collator(
            torch.tensor([0]),
            torch.tensor([2 * NUM_RELATIONS]),
            features[:1],
            torch.ones(1, 1, dtype=torch.bool),
        )


def test_encode_queries_unit_vectors_directions_and_missing_images(tokenizer, collator):
    model = make_model(tokenizer)
    features = random_features(4, 3, model)
    image_mask = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    entities = torch.tensor([0, 0, 1, 2])
    qrels = torch.tensor([1, 1 + NUM_RELATIONS, 0, 2])
    features[1] = features[0]
    with torch.no_grad():
        queries = model.encode_queries(collator(entities, qrels, features, image_mask))
        scores = model.score(queries)
    assert queries.shape == (4, model.embed_dim) and torch.isfinite(queries).all()
    assert torch.allclose(queries.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert not torch.allclose(queries[0], queries[1], atol=1e-4)  # tail vs head prediction
    assert scores.shape == (4, len(ENTITY_TEXTS))
    assert scores.abs().max() <= 1 / model.temperature + 1e-3
    # A row's vector does not depend on the rest of the batch (padding + packing).
    with torch.no_grad():
        alone = model.encode_queries(
            collator(entities[2:3], qrels[2:3], features[2:3, :1], image_mask[2:3, :1])
        )
    assert torch.allclose(alone[0], queries[2], atol=1e-5)


def test_encode_entities_and_init_entity_table(tokenizer, collator):
    model = make_model(tokenizer)
    features = random_features(len(ENTITY_TEXTS), 2, model)
    image_mask = torch.ones(len(ENTITY_TEXTS), 2, dtype=torch.bool)
    entities = torch.arange(len(ENTITY_TEXTS))
    with torch.no_grad():
        vectors = model.encode_entities(collator.entity_batch(entities, features, image_mask))
    model.init_entity_table(vectors)
    assert torch.allclose(model.entity_table.weight, vectors, atol=1e-6)
    with pytest.raises(ValueError, match="outside the table"):
        model.init_entity_table(vectors, start=1)


def test_bfloat16_model_encodes_finite_unit_vectors(tokenizer, collator):
    model = make_model(tokenizer, dtype="bfloat16")
    assert model.mvtc.visual_queries.dtype == torch.bfloat16
    features = random_features(2, 2, model)
    batch = collator(
        torch.tensor([0, 1]),
        torch.tensor([0, 4]),
        features,
        torch.tensor([[1, 1], [0, 0]], dtype=torch.bool),
    )
    with torch.no_grad():
        scores = model(batch)
    assert scores.dtype == torch.bfloat16 and torch.isfinite(scores).all()


def test_uncompressed_mode_puts_every_patch_token_in_the_prompt(tokenizer, collator):
    compressed = make_model(tokenizer)
    uncompressed = make_model(tokenizer, uncompressed=True)
    assert uncompressed.mvtc is None
    features = random_features(2, 3, compressed)
    image_mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    batch = collator(torch.tensor([0, 3]), torch.tensor([0, 4]), features, image_mask)
    with torch.no_grad():
        _, small_mask, _ = compressed.build_prompt(batch)
        _, big_mask, _ = uncompressed.build_prompt(batch)
        vectors = uncompressed.encode_queries(batch)
    text_tokens = small_mask.sum(1) - 8  # 4 + 4 MVTC tokens per entity with images
    assert big_mask.sum(1).tolist() == (text_tokens + torch.tensor([3 * 16, 16])).tolist()
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(2), atol=1e-5)


# --- LoRA ------------------------------------------------------------------------------


def test_lora_targets_only_the_language_model(tokenizer):
    model = make_model(tokenizer)
    names = apply_lora(model, r=4, alpha=8, dropout=0.0, target_regex=LORA_REGEX)
    assert len(names) == 2 * 4  # 2 layers x q, k, v, o
    assert all(".language_model." in name for name in names)
    assert not lora_layers(model.backbone.model.vision_tower)
    for name, parameter in model.named_parameters():
        head = name.split(".")[0] in {"mvtc", "readout", "entity_table", "learned_tokens"}
        expected = ".lora_" in name or head or ".multi_modal_projector." in name
        assert parameter.requires_grad == expected, name
    other = make_model(tokenizer)
    with pytest.raises(ValueError, match="outside the language model"):
        apply_lora(other, r=2, alpha=2, dropout=0.0, target_regex=r".*\.(q_proj|v_proj)$")


def test_save_and_load_trainable_restore_identical_scores(tmp_path, tokenizer, collator):
    model = make_model(tokenizer)
    apply_lora(model, r=4, alpha=8, dropout=0.0, target_regex=LORA_REGEX)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    features = random_features(3, 2, model)
    batch = collator(
        torch.tensor([0, 1, 4]),
        torch.tensor([0, 5, 2]),
        features,
        torch.tensor([[1, 1], [1, 0], [0, 0]], dtype=torch.bool),
    )
    save_trainable(model, tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / "trainable.json").read_text())
    assert manifest["lora"]["r"] == 4 and manifest["adapter"]
    fresh = make_model(tokenizer)
    load_trainable(fresh, tmp_path / "ckpt")  # adds the LoRA layers itself
    with torch.no_grad():
        expected, actual = model(batch), fresh(batch)
    assert torch.equal(expected, actual)
    with torch.no_grad():
        merged = merge_lora(fresh)
        assert merged == 8 and not lora_layers(fresh)
        assert torch.allclose(fresh(batch), expected, atol=1e-4)
    wrong_rank = make_model(tokenizer)
    apply_lora(wrong_rank, r=2, alpha=8, dropout=0.0, target_regex=LORA_REGEX)
    with pytest.raises(CheckpointMismatchError, match="lora_A"):
        load_trainable(wrong_rank, tmp_path / "ckpt")


def test_a_few_steps_decrease_a_contrastive_loss(tokenizer, collator):
    torch.manual_seed(0)
    model = make_model(tokenizer)
    apply_lora(model, r=4, alpha=8, dropout=0.0, target_regex=LORA_REGEX)
    model.train()
    entities = torch.tensor([0, 1, 2, 3, 4, 5])
    qrels = torch.tensor([0, 1, 2, 3, 4, 5])
    answers = torch.tensor([1, 3, 0, 4, 2, 5])
    features = random_features(6, 2, model)
    image_mask = torch.tensor([[1, 1], [1, 0], [0, 0], [1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    batch = collator(entities, qrels, features, image_mask)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-3)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(batch), answers)
        loss.backward()
        if not losses:
            grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
            for part in ("mvtc.", "readout.", "entity_table.", "lora_B", "learned_tokens."):
                assert any(
                    part in n and g is not None and g.abs().sum() > 0 for n, g in grads.items()
                ), part
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


# --- entity image pathway ---------------------------------------------------------------


def test_entity_image_adapter_starts_as_the_table_and_handles_missing_images(tokenizer):
    model = make_model(tokenizer)
    table = model.entity_table
    assert table.visual is not None
    rows = torch.nn.functional.normalize(table.weight, dim=-1)
    assert torch.allclose(model.entity_vectors(), rows, atol=1e-6)  # zero-initialised last layer
    features = random_features(len(ENTITY_TEXTS), 2, model)
    mask = torch.ones(len(ENTITY_TEXTS), 2, dtype=torch.bool)
    mask[0] = False  # entity 0 has no images
    mask[1, 1] = False  # entity 1 has one image: the padding image must not count
    table.set_visual_summary(features, mask)
    assert torch.equal(table.visual_summary[0], torch.zeros_like(table.visual_summary[0]))
    one = features[1, 0].float()
    expected = torch.cat([one.mean(0), one.amax(0)])
    assert torch.allclose(table.visual_summary[1], expected, atol=1e-5)
    torch.nn.init.normal_(table.visual[-1].weight)
    subset = torch.tensor([3, 1])
    assert torch.allclose(model.entity_vectors(subset), model.entity_vectors()[subset], atol=1e-6)
    assert torch.isfinite(model.entity_vectors()).all()


def test_no_image_ablation_has_no_image_pathway(tokenizer):
    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, mvtc=dataclasses.replace(cfg.mvtc, n_visual=0, n_text=0))
    model = build_elmm(cfg, num_entities=len(ENTITY_TEXTS), tokenizer=tokenizer)
    assert model.entity_table.visual is None
    cfg = tiny_config(entity_image_adapter=False)
    assert build_elmm(cfg, num_entities=len(ENTITY_TEXTS),
                      tokenizer=tokenizer).entity_table.visual is None


# --- entity encoder (bi-encoder) --------------------------------------------------------


def test_encoder_candidates_send_gradient_to_mvtc_and_lora(tokenizer, collator):
    """model.entity_repr=encoder: the loss reaches MVTC, the LoRA weights and the readout
    through the candidates' own encodings (no query in the batch reads images, so every
    MVTC gradient comes from the candidate side), and the unused table is not trained."""
    from elmm_ray.data.image_features import FeatureBank
    from elmm_ray.data.kg import FilterIndex
    from elmm_ray.train.step import compute_loss

    torch.manual_seed(0)
    model = make_model(tokenizer, entity_repr="encoder")
    apply_lora(model, r=4, alpha=8, dropout=0.0, target_regex=LORA_REGEX)
    assert not model.entity_table.weight.requires_grad and model.encodes_entities
    model.train()
    features = random_features(len(ENTITY_TEXTS), 2, model)
    mask = torch.ones(len(ENTITY_TEXTS), 2, dtype=torch.bool)
    mask[[0, 3]] = False  # the query entities have no pictures
    bank = FeatureBank(features, mask)
    queries = torch.tensor([[0, 0, 1], [3, 1, 4]])
    known = FilterIndex(np.array([[0, 0, 1], [4, 1, 3]]), NUM_RELATIONS)
    parts = compute_loss(model, collator, bank, queries, known, num_negatives=3,
                         knowledge_weight=0.0, generator=torch.Generator().manual_seed(0))
    parts.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for part in ("mvtc.", "lora_B", "readout."):
        assert any(part in n and g is not None and g.abs().sum() > 0
                   for n, g in grads.items()), part


def test_hard_negatives_from_the_cache_are_encoded_with_gradients(tokenizer, collator):
    """train.hard_negatives: the queries' highest-scoring non-answers against the entity
    cache join the candidates that are encoded with gradients."""
    from elmm_ray.data.image_features import FeatureBank
    from elmm_ray.data.kg import FilterIndex
    from elmm_ray.train.step import compute_loss

    torch.manual_seed(0)
    model = make_model(tokenizer, entity_repr="encoder").train()
    bank = FeatureBank(random_features(len(ENTITY_TEXTS), 2, model),
                       torch.ones(len(ENTITY_TEXTS), 2, dtype=torch.bool))
    queries = torch.tensor([[0, 0, 1], [3, 1, 4]])
    known = FilterIndex(np.array([[0, 0, 1], [0, 0, 2], [3, 1, 4], [3, 1, 2]]), NUM_RELATIONS)
    with torch.no_grad():
        query_vectors = model.encode_queries(collator(
            queries[:, 0], queries[:, 1], *bank.features_for(queries[:, 0])))
    cache = torch.randn(len(ENTITY_TEXTS), query_vectors.shape[1])
    cache[5] = query_vectors[0]  # the hardest non-answer of query 0
    cache[2] = 10 * query_vectors[0]  # scores higher, but a known answer of both
    model.set_entity_cache(cache)
    seen = []
    encode = model.candidate_vectors
    model.candidate_vectors = lambda ids, batch: seen.append(ids.tolist()) or encode(ids, batch)
    parts = compute_loss(model, collator, bank, queries, known, num_negatives=0,
                         num_hard_negatives=2, knowledge_weight=0.0)
    parts.loss.backward()
    assert set(seen[0]) >= {0, 1, 3, 4}  # the answers and the query entities
    assert 5 in seen[0] and 2 not in seen[0]
    assert torch.isfinite(parts.loss)
    without = compute_loss(model, collator, bank, queries, known, num_negatives=0,
                           knowledge_weight=0.0)
    assert len(seen[1]) == 4 and not torch.isclose(without.loss, parts.loss)


def test_a_refreshed_cache_equals_a_fresh_encoding(tokenizer, collator):
    from elmm_ray.data.image_features import FeatureBank
    from elmm_ray.eval.evaluate import encode_all_entities, refresh_entity_cache

    for repr_ in ("encoder", "table+encoder"):
        model = make_model(tokenizer, entity_repr=repr_)
        everyone = torch.ones(len(ENTITY_TEXTS), 2, dtype=torch.bool)
        bank = FeatureBank(random_features(len(ENTITY_TEXTS), 2, model), everyone)
        refresh_entity_cache(model, collator, bank, batch_size=4)
        fresh = torch.nn.functional.normalize(
            encode_all_entities(model, collator, bank, batch_size=3), dim=-1)
        if repr_ == "encoder":
            torch.testing.assert_close(model.entity_vectors(), fresh, atol=1e-6, rtol=1e-5)
        else:
            rows = torch.nn.functional.normalize(model.entity_table.weight, dim=-1)
            expected = torch.nn.functional.normalize(rows + fresh, dim=-1)
            torch.testing.assert_close(model.entity_vectors(), expected, atol=1e-6, rtol=1e-5)
        ids = torch.tensor([4, 1])
        torch.testing.assert_close(model.entity_vectors(ids), model.entity_vectors()[ids])


class _SimulatedRank:
    """Rank ``rank`` of ``world`` run in this process after the others: ``gather_rows`` hands
    back the other ranks' rows that an earlier pass recorded in ``book`` (values, as an
    all-gather does) and this rank's own rows with their gradient; ``all_sum`` likewise."""

    def __init__(self, rank: int, world: int, book: dict) -> None:
        self.rank, self.world, self.book, self.calls = rank, world, book, 0

    def _collect(self, value):
        key, self.calls = self.calls, self.calls + 1
        self.book.setdefault(key, {})[self.rank] = value
        return self.book[key]

    def gather_rows(self, local, counts):
        parts = self._collect(local.detach().clone())
        return torch.cat([local if r == self.rank else
                          parts.get(r, local.new_zeros(counts[r], *local.shape[1:]))
                          for r in range(self.world)])

    def all_sum(self, value):
        return float(sum(self._collect(value).values()))


@pytest.mark.parametrize("entity_repr", ["table", "encoder"])
def test_the_loss_of_a_global_batch_is_the_same_on_1_2_and_3_ranks(tokenizer, collator,
                                                                    entity_repr):
    """One objective at every world size: the global batch's loss (in-batch answers, sampled
    and hard negatives of the whole batch, L_knowledge) and its gradient, as data parallelism
    averages the ranks' gradients, equal one process's to float rounding (the ranks encode
    different slices; each encoding has its gradient on one rank)."""
    from elmm_ray.data.image_features import FeatureBank
    from elmm_ray.data.kg import FilterIndex
    from elmm_ray.train.step import compute_loss

    torch.manual_seed(0)
    model = make_model(tokenizer, entity_repr=entity_repr)
    apply_lora(model, r=4, alpha=8, dropout=0.0, target_regex=LORA_REGEX)
    model.train()
    bank = FeatureBank(random_features(len(ENTITY_TEXTS), 2, model),
                       torch.ones(len(ENTITY_TEXTS), 2, dtype=torch.bool))
    if model.encodes_entities:
        model.set_entity_cache(torch.randn(len(ENTITY_TEXTS), model.embed_dim))
    queries = torch.tensor([[0, 0, 1], [3, 1, 4], [2, 0, 5], [5, 1, 2], [4, 0, 0]])
    known = FilterIndex(np.array([[0, 0, 1], [3, 1, 4], [2, 0, 5], [5, 1, 2], [4, 0, 0],
                                  [0, 0, 2]]), NUM_RELATIONS)
    params = [p for p in model.parameters() if p.requires_grad]

    def run(group=None):
        model.zero_grad(set_to_none=True)
        parts = compute_loss(model, collator, bank, queries, known, num_negatives=3,
                             num_hard_negatives=2, knowledge_weight=0.5, group=group,
                             generator=torch.Generator().manual_seed(7))
        parts.loss.backward()
        return parts, [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                       for p in params]

    one, grads_one = run()
    assert one.knowledge > 0 and one.task > 0
    for world in (2, 3):
        book: dict = {}
        for rank in range(world):  # the first pass records every rank's rows
            run(_SimulatedRank(rank, world, book))
        averaged = [torch.zeros_like(g) for g in grads_one]
        for rank in range(world):
            parts, grads = run(_SimulatedRank(rank, world, book))
            assert parts.value == pytest.approx(one.value, rel=1e-5)
            assert parts.knowledge == pytest.approx(one.knowledge, rel=1e-5)
            averaged = [a + g / world for a, g in zip(averaged, grads, strict=True)]
        scale = max(g.abs().max().item() for g in grads_one)
        worst = max((a - g).abs().max().item() for a, g in zip(averaged, grads_one, strict=True))
        assert worst <= 1e-5 * scale, (world, worst, scale)

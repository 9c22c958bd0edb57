"""Standalone vision towers (issue 22): tiny CLIP and SigLIP towers built with transformers
and saved like hub checkpoints, loaded by `model.vision_tower`, joined to the tiny LLM or to
an HF causal LM, preprocessed by their own processor settings, with features equal to the
tower's own forward on its processor's pixels (in process and through the Ray pipeline).

Tolerances: pixels are compared at 1e-6 (the same PIL resize, float64 rescale, float32
normalisation); features are stored in fp16, so they are compared at fp16's resolution
(rtol 1e-3 >= 2^-11, atol 1e-3 for values near zero), which holds on any CPU kernel set."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from elmm_ray.config import load_config
from elmm_ray.data.pixels import PixelSpec, tower_pixels
from elmm_ray.layout import RunLayout, absolute_paths
from elmm_ray.models.backbone import BackboneLoadError, encode_images, load_backbone
from elmm_ray.models.towers import load_tower, pixel_spec, tower_family
from tests.tiny import TINY

REPO_ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("clip", "siglip")
FP16 = {"rtol": 1e-3, "atol": 1e-3}


def save_tiny_tower(family: str, out: Path, *, image_size: int = 32, patch_size: int = 8,
                    seed: int = 0) -> Path:
    """A random-init 2-layer tower of ``family`` with its image processor, as
    `save_pretrained` writes a hub checkpoint (CLIP: shortest edge + centre crop, CLIP's
    mean/std; SigLIP: square resize, mean/std 0.5)."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    torch.manual_seed(seed)
    if family == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**sizes))
        processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                          crop_size={"height": image_size, "width": image_size})
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**sizes))
        processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("towers")
    return {f: save_tiny_tower(f, root / f) for f in FAMILIES}


def _images() -> list[Image.Image]:
    """Odd sizes and aspect ratios, RGBA and greyscale among them."""
    rng = np.random.default_rng(0)
    shapes = [(50, 37, "RGB"), (20, 64, "RGB"), (32, 32, "RGBA"), (90, 41, "L")]
    out = []
    for width, height, mode in shapes:
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        data = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        out.append(Image.fromarray(data.squeeze(-1) if channels == 1 else data, mode=mode))
    return out


def _processor(path: Path):
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    kind = json.loads((path / "preprocessor_config.json").read_text())["image_processor_type"]
    cls = CLIPImageProcessorPil if kind.startswith("CLIP") else SiglipImageProcessorPil
    return cls.from_pretrained(path)


def _reference(path: Path, images: list[Image.Image], layer: int = -2) -> torch.Tensor:
    """The tower's own forward (transformers' class and processor): ``layer``'s patch
    tokens, CLS dropped for CLIP."""
    from transformers import CLIPVisionModel, SiglipVisionModel

    family = tower_family(str(path))
    model = (CLIPVisionModel if family == "clip" else SiglipVisionModel).from_pretrained(path)
    pixels = _processor(path)(images,
                              return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = model(pixels, output_hidden_states=True).hidden_states[layer]
    return hidden[:, 1:] if family == "clip" else hidden


@pytest.mark.parametrize("family", FAMILIES)
def test_pixels_equal_the_towers_processor(towers, family):
    path = towers[family]
    spec = pixel_spec(str(path))
    ref = _processor(path)(_images(),
                           return_tensors="np")["pixel_values"]
    ours = tower_pixels(_images(), spec)
    assert ours.shape == ref.shape == (4, 3, 32, 32)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
    assert PixelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    if family == "siglip":
        assert spec.crop is None and spec.mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", [-2, -1])
def test_standalone_tower_features_equal_its_own_forward(towers, family, layer):
    path = towers[family]
    tower = load_tower(str(path))
    pixels = torch.from_numpy(tower_pixels(_images(), pixel_spec(str(path))))
    features = encode_images(tower, pixels, layer=layer)
    assert features.shape == (4, 16, 32)  # 4 x 4 patches; SigLIP has no CLS to drop
    torch.testing.assert_close(features.float(), _reference(path, _images(), layer), **FP16)


def test_other_families_and_processors_are_refused(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, image_size=32, patch_size=8)).save_pretrained(
        tmp_path / "vit")
    with pytest.raises(BackboneLoadError, match=r"'vit' model; supported vision towers: "
                       r"clip_vision_model, clip, siglip_vision_model, siglip"):
        load_tower(str(tmp_path / "vit"))
    with pytest.raises(BackboneLoadError, match="directory .*nowhere does not exist"):
        load_tower(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="image_processor_type 'ViTImageProcessor' is not "
                       "supported; supported: CLIPImageProcessor, SiglipImageProcessor"):
        PixelSpec.from_processor_config({"image_processor_type": "ViTImageProcessor"})


def _cfg(run_dir: Path, tower: Path, *extra: str):
    return absolute_paths(load_config(REPO_ROOT / "configs" / "demo.yaml", [
        f"run_dir={run_dir}", *TINY, f"model.vision_tower={tower}", *extra]))


@pytest.mark.parametrize("family", FAMILIES)
def test_tower_joins_the_tiny_llm_through_from_pretrained(towers, family, tmp_path):
    from elmm_ray.data.dataset import load_dataset
    from elmm_ray.stages import run_stage
    from elmm_ray.train.context import backbone_source

    cfg = _cfg(tmp_path / "run", towers[family])
    run_stage("synth", cfg)
    kg = load_dataset(cfg)
    source = backbone_source(cfg, kg, RunLayout.of(cfg))
    assert source == str(RunLayout.of(cfg).backbone)
    llava = load_backbone(source)  # the composed model, saved and loaded like a checkpoint
    assert llava.config.vision_config.model_type == f"{family}_vision_model"
    assert llava.config.vision_feature_select_strategy == (
        "default" if family == "clip" else "full")
    assert llava.config.vision_feature_layer == cfg.model.vision_feature_layer
    own = load_tower(str(towers[family])).state_dict()
    for key, value in llava.model.vision_tower.state_dict().items():
        assert torch.equal(value, own[key]), key
    assert pixel_spec(source) == pixel_spec(str(towers[family]))
    with pytest.raises(ValueError, match="use a new run_dir"):  # another tower, same run
        backbone_source(_cfg(tmp_path / "run", towers["siglip" if family == "clip" else "clip"]),
                        kg, RunLayout.of(cfg))


def test_tower_joins_an_hf_causal_lm(towers, tmp_path):
    """`model.backbone` = a Llama checkpoint (not a LLaVA): its decoder and head under the
    SigLIP tower, loaded with from_pretrained; the prompt tokens are added to its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from elmm_ray.data.dataset import load_dataset
    from elmm_ray.models.tokenizer import train_tokenizer
    from elmm_ray.stages import run_stage
    from elmm_ray.train.context import backbone_source, build_model, get_tokenizer

    llm_dir = tmp_path / "llama"
    tokenizer = train_tokenizer(["a tiny corpus for a tiny llama"] * 4, 200)
    torch.manual_seed(1)
    llama = LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256))
    llama.save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    cfg = _cfg(tmp_path / "run", towers["siglip"], f"model.backbone={llm_dir}")
    run_stage("synth", cfg)
    kg = load_dataset(cfg)
    layout = RunLayout.of(cfg)
    composed = load_backbone(backbone_source(cfg, kg, layout))
    for key, value in llama.model.state_dict().items():
        assert torch.equal(composed.model.language_model.state_dict()[key], value), key
    assert composed.config.text_config.model_type == "llama"
    model = build_model(cfg, kg, get_tokenizer(cfg, kg, layout), layout)
    tokens = len(get_tokenizer(cfg, kg, layout))
    assert model.backbone.get_input_embeddings().num_embeddings >= tokens


@pytest.fixture(scope="module")
def pipelines(towers, tmp_path_factory, ray_session):
    """Per tower: synth, pack, extract (Ray Data actors load the tower alone from the
    composed checkpoint), then a short local training and the evaluation."""
    from elmm_ray.data.dataset import load_dataset
    from elmm_ray.stages import run_stage, run_stages

    out = {}
    for family in FAMILIES:
        cfg = _cfg(tmp_path_factory.mktemp(f"run-{family}"), towers[family],
                   "train.epochs=1", "train.max_steps=4", "ray.data_actors=1",
                   "ray.data_batch_size=16")
        run_stage("synth", cfg)
        kg = load_dataset(cfg)
        extract = run_stage("extract", cfg, kg=kg, show_progress=False)
        evaluated = run_stages(["eval"], cfg, kg=kg, show_progress=False)["eval"]
        out[family] = cfg, kg, extract, evaluated
    return out


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_features_equal_the_towers_forward(pipelines, towers, family):
    from elmm_ray.data.feature_store import FeatureStore
    from elmm_ray.data.image_features import features_from_shards, read_shard_rows

    cfg, kg, extract, evaluated = pipelines[family]
    store = FeatureStore.open(extract.manifest["store"])
    assert store.metadata["pixels"] == pixel_spec(str(towers[family])).to_dict()
    rows = read_shard_rows(RunLayout.of(cfg).shard_dir, cfg.images.max_images_per_entity)
    slot: dict[int, int] = {}
    entities, slots, images = [], [], []
    for entity, _, data in rows:
        slot[entity] = slot.get(entity, -1) + 1
        entities.append(entity)
        slots.append(slot[entity])
        images.append(Image.open(io.BytesIO(data)))
    feats, mask = store.features_for(torch.tensor(entities))
    assert mask[torch.arange(len(entities)), torch.tensor(slots)].all()
    got = feats[torch.arange(len(entities)), torch.tensor(slots)]
    want = _reference(towers[family], images, cfg.model.vision_feature_layer)
    torch.testing.assert_close(got, want, **FP16)
    # the in-process path (no feature store) reads the same preprocessing from the backbone
    source = str(RunLayout.of(cfg).backbone)
    bank = features_from_shards(load_tower(str(towers[family])), RunLayout.of(cfg).shard_dir,
                                num_entities=kg.num_entities,
                                max_images=cfg.images.max_images_per_entity, image_size=32,
                                layer=cfg.model.vision_feature_layer, pixels=pixel_spec(source))
    in_process = bank.features_for(torch.tensor(entities))[0]
    torch.testing.assert_close(in_process[torch.arange(len(entities)), torch.tensor(slots)],
                               want, **FP16)
    metrics = json.loads(RunLayout.of(cfg).path("train", "summary.json").read_text())
    assert len(metrics["losses"]) == 4 and all(np.isfinite(metrics["losses"]))
    assert 0 < evaluated.manifest["overall"]["mrr"] <= 1


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_the_demo_preset_trains_and_its_tower_counts_by_contents(tmp_path, ray_session):
    """The demo's preset (tiny-pretrained: the committed tower under the tiny LLM) through
    pack, extract, train (locally) and eval on the tiny KG. The run's backbone is composed
    and records the tower by its contents, so the same tower at another path (a moved
    checkout, a Ray job's uploaded working_dir) reuses the run: no stage re-runs and the
    backbone is accepted; a tower whose files differ is refused."""
    import shutil

    from elmm_ray.data.dataset import load_dataset
    from elmm_ray.layout import tower_reference
    from elmm_ray.models.towers import composed_identity
    from elmm_ray.stages import run_stages
    from elmm_ray.train.context import backbone_source
    from tests.tiny import TINY_DATA, TINY_LOCAL_TRAIN

    committed = REPO_ROOT / "towers" / "elmm-tiny-clip"
    run = [f"run_dir={tmp_path / 'run'}", *TINY_DATA, *TINY_LOCAL_TRAIN, "train.epochs=1",
           "train.max_steps=3", "mvtc.n_visual=4", "mvtc.n_text=4", "mvtc.heads=2",
           "model.entity_repr=table"]
    cfg = absolute_paths(load_config(REPO_ROOT / "configs" / "demo.yaml", run))
    assert Path(cfg.model.vision_tower) == committed
    first = run_stages(["eval"], cfg, show_progress=False)
    assert not any(r.skipped for r in first.values())
    layout = RunLayout.of(cfg)
    assert json.loads(layout.metrics_file("test").read_text())["overall"]["mrr"] > 0
    identity = composed_identity(layout.backbone)
    assert identity["vision_tower"] == tower_reference(str(committed))
    assert identity["vision_tower"].startswith("sha256:")
    assert load_backbone(str(layout.backbone)).config.vision_config.patch_size == 8

    moved = tmp_path / "elsewhere" / "elmm-tiny-clip"
    shutil.copytree(committed, moved)
    again = absolute_paths(load_config(REPO_ROOT / "configs" / "demo.yaml",
                                       [*run, f"model.vision_tower={moved}"]))
    rerun = run_stages(["eval"], again, show_progress=False)
    assert set(rerun) == set(first) and all(r.skipped for r in rerun.values())
    kg = load_dataset(again)
    assert backbone_source(again, kg, layout) == str(layout.backbone)

    (moved / "config.json").write_text((moved / "config.json").read_text() + "\n")
    assert tower_reference(str(moved)) != identity["vision_tower"]
    with pytest.raises(ValueError, match="use a new run_dir"):
        backbone_source(again, kg, layout)

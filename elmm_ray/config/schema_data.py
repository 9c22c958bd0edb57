"""The data side of the config schema: the dataset (incl. the synthetic KG and
precomputed visual embeddings) and the images."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass

from elmm_ray.config.fields import SECTION, Bool, Float, Int, OptStr, Str, _raise_problems


@dataclass(config=SECTION)
class SynthConfig:
    """The synthetic multimodal KG generator (used when ``dataset.name == 'synthetic'``)."""

    num_entities: Int = Field(300, description="entities to generate", ge=8)
    num_relations: Int = Field(
        6, description="relations to generate (attribute relations first)", ge=2
    )
    min_images: Int = Field(1, description="fewest images per entity", ge=0, le=10)
    max_images: Int = Field(4, description="most images per entity (0..10)", ge=0, le=10)
    image_size: Int = Field(
        64, description="side of the generated square images in pixels", ge=16, le=1024
    )
    no_image_fraction: Float = Field(
        0.0, description="share of entities that get no images at all", ge=0.0, le=1.0
    )
    inject_faults: Bool = Field(
        False, description="write faulty image files for the reliability tests"
    )
    seed: Int = Field(0, description="seed of the generator (same seed, same files)")

    @model_validator(mode="after")
    def _rules(self) -> SynthConfig:
        if self.min_images > self.max_images:
            _raise_problems([f"`dataset.synth.min_images` = {self.min_images} exceeds "
                             f"`dataset.synth.max_images` = {self.max_images}; "
                             "lower one of them"])
        return self


EMBEDDING_SUFFIXES = (".npy", ".npz", ".safetensors", ".pt", ".pth")


@dataclass(config=SECTION)
class VisualEmbeddingsConfig:
    """Precomputed per-entity visual embeddings that replace images (as MMKG releases such
    as NativE ship them): the extract stage writes the feature store from this file
    instead of running the vision tower."""

    path: OptStr = Field(
        None, description="per-entity embedding file (.npy, .npz, .safetensors, .pt/.pth "
        "read with torch.load(weights_only=True)); shape [entities, dim], [entities, "
        "n_images, dim] or [entities, n_tokens, dim]; null: images are used"
    )
    key: OptStr = Field(
        None, description="the array's name in a file holding several (.npz, "
        ".safetensors, a dict in .pt); null: the file's only array"
    )
    ids: OptStr = Field(
        None, description="optional text file naming the entity of each row, one name per "
        "line; null: rows are in the dataset's entity order (their count must match)"
    )
    axis: Literal["images", "tokens"] = Field(
        "images", description="what the middle axis of a 3-D array holds: one vector per "
        "image (each an image slot, first images.max_images_per_entity kept) or the "
        "tokens of one entity (one image slot of n_tokens tokens)"
    )

    @model_validator(mode="after")
    def _rules(self) -> VisualEmbeddingsConfig:
        if self.path is None:
            return self
        suffix = "." + self.path.rsplit(".", 1)[-1].lower() if "." in self.path else ""
        if suffix in (".pkl", ".pickle"):
            _raise_problems([
                f"`dataset.visual_embeddings.path` = {self.path!r} is a pickle, which is "
                "never loaded (it can run code); convert it once in the environment that "
                "made it, e.g. numpy.save('visual.npy', numpy.asarray(obj, dtype='float32')) "
                "with an ids file for a dict, and set this key to the .npy"])
        if suffix not in EMBEDDING_SUFFIXES:
            _raise_problems([f"`dataset.visual_embeddings.path` = {self.path!r}: unknown "
                             f"file type {suffix or '(none)'!r}; use one of "
                             f"{', '.join(EMBEDDING_SUFFIXES)}"])
        return self


@dataclass(config=SECTION)
class DatasetConfig:
    """The dataset: a folder in MKGformer, OpenKE or MyGO/NativE layout, or a generated
    synthetic one."""

    name: Str = Field(
        "synthetic", description="dataset label; 'synthetic' generates one into the run dir"
    )
    path: OptStr = Field(
        None, description="dataset folder; null with name=synthetic means <run_dir>/data"
    )
    format: Literal["auto", "mkgformer", "openke", "mygo"] = Field(
        "auto", description="file layout; auto: train.tsv -> mkgformer, train2id.txt -> "
        "openke, train.txt -> mygo (MyGO/NativE)"
    )
    image_root: OptStr = Field(
        None, description="folder of per-entity image folders; null: <path>/images"
    )
    use_long_text: Bool = Field(
        False, description="use entity2textlong.txt descriptions when present"
    )
    synth: SynthConfig = Field(default_factory=SynthConfig,
                               description="the synthetic KG generator")
    visual_embeddings: VisualEmbeddingsConfig = Field(
        default_factory=VisualEmbeddingsConfig,
        description="precomputed per-entity visual embeddings instead of images")

    @model_validator(mode="after")
    def _rules(self) -> DatasetConfig:
        if self.name != "synthetic" and not self.path:
            _raise_problems([f"`dataset.path` is not set but `dataset.name` = {self.name!r} "
                             "is not 'synthetic'; give the dataset folder"])
        return self


@dataclass(config=SECTION)
class ImagesConfig:
    """Packing images into Parquet shards and the feature store of vision features."""

    shard_dir: OptStr = Field(None, description="Parquet image shards; null: <run_dir>/shards")
    max_shard_bytes: Int = Field(
        64 * 1024 * 1024, description="upper bound of encoded image bytes per shard", ge=1024
    )
    feature_store: OptStr = Field(
        None,
        description="feature store location (local path or cloud URI); null: <run_dir>/features",
    )
    max_images_per_entity: Int = Field(
        10, description="images used per entity (first N, sorted)", ge=0, le=64
    )
    min_side: Int = Field(
        8, description="images with a side below this many pixels count as degenerate", ge=1
    )
    num_cpus_per_task: Float = Field(
        0.5, description="CPUs per Ray Data decode/validate task", gt=0
    )

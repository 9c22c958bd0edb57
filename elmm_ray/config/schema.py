"""The typed configuration of every stage.

One dataclass per section; the field's ``help`` metadata is what ``elmm-ray --help`` and
error messages print. Allowed values live next to the field (``choices``, ``ge``/``le``)
so that :func:`elmm_ray.config.load.validate` can check everything in one pass and list
every problem at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def opt(default: Any, help: str, **rules: Any) -> Any:
    """A dataclass field with a help text and validation rules (choices, ge, gt, le, lt)."""
    metadata = {"help": help, **rules}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class SynthConfig:
    """The synthetic multimodal KG generator (used when ``dataset.name == 'synthetic'``)."""

    num_entities: int = opt(300, "entities to generate", ge=8)
    num_relations: int = opt(6, "relations to generate (attribute relations first)", ge=2)
    min_images: int = opt(1, "fewest images per entity", ge=0, le=10)
    max_images: int = opt(4, "most images per entity (0..10)", ge=0, le=10)
    image_size: int = opt(64, "side of the generated square images in pixels", ge=16, le=1024)
    no_image_fraction: float = opt(
        0.0, "share of entities that get no images at all", ge=0.0, le=1.0
    )
    inject_faults: bool = opt(False, "write faulty image files for the reliability tests")
    seed: int = opt(0, "seed of the generator (same seed, same files)")


@dataclass
class DatasetConfig:
    name: str = opt("synthetic", "dataset label; 'synthetic' generates one into the run dir")
    path: str = opt("", "dataset folder; empty with name=synthetic means <run_dir>/data")
    format: str = opt("auto", "file layout", choices=["auto", "mkgformer", "openke"])
    image_root: str = opt("", "folder of per-entity image folders; empty: <path>/images")
    use_long_text: bool = opt(False, "use entity2textlong.txt descriptions when present")
    synth: SynthConfig = field(default_factory=SynthConfig)


@dataclass
class ImagesConfig:
    shard_dir: str = opt("", "Parquet image shards; empty: <run_dir>/shards")
    max_shard_bytes: int = opt(
        64 * 1024 * 1024, "upper bound of encoded image bytes per shard", ge=1024
    )
    feature_store: str = opt(
        "", "feature store location (local path or cloud URI); empty: <run_dir>/features"
    )
    max_images_per_entity: int = opt(10, "images used per entity (first N, sorted)", ge=0, le=64)
    min_side: int = opt(
        8, "images with a side below this many pixels count as degenerate", ge=1
    )
    num_cpus_per_task: float = opt(0.5, "CPUs per Ray Data decode/validate task", gt=0)


@dataclass
class ModelConfig:
    backbone: str = opt(
        "tiny", "'tiny' (random init from the sizes below) or a HF checkpoint id/local dir"
    )
    dtype: str = opt("float32", "parameter dtype", choices=["float32", "bfloat16", "float16"])
    vision_feature_layer: int = opt(-2, "vision tower hidden layer to use (LLaVA: -2)")
    feature_pool: int = opt(1, "spatial pooling stride over the patch grid (1 = none)", ge=1, le=8)
    temperature: float = opt(0.05, "cosine-score temperature", gt=0)
    uncompressed: bool = opt(
        False, "baseline: all projected patch tokens in the prompt instead of MVTC tokens"
    )
    entity_image_adapter: bool = opt(
        True, "entity vectors = table row + a shared adapter over the entity's pooled patch "
        "features (only when the model reads images)"
    )
    max_text_tokens: int = opt(32, "tokens kept of an entity's name + description", ge=4)
    # Tiny backbone sizes (ignored for a real checkpoint).
    vision_hidden: int = opt(64, "tiny CLIP width", ge=8)
    vision_layers: int = opt(2, "tiny CLIP layers", ge=1)
    vision_heads: int = opt(4, "tiny CLIP heads", ge=1)
    image_size: int = opt(64, "tiny CLIP input side (pixels)", ge=8)
    patch_size: int = opt(16, "tiny CLIP patch side (pixels)", ge=2)
    llm_hidden: int = opt(128, "tiny Llama width", ge=8)
    llm_layers: int = opt(4, "tiny Llama layers", ge=1)
    llm_heads: int = opt(4, "tiny Llama attention heads", ge=1)
    llm_kv_heads: int = opt(2, "tiny Llama key/value heads (GQA)", ge=1)
    llm_intermediate: int = opt(256, "tiny Llama MLP width", ge=8)
    vocab_size: int = opt(2000, "tiny tokenizer vocabulary size", ge=64)


@dataclass
class MVTCConfig:
    n_visual: int = opt(32, "visual-view query tokens", ge=0, le=1024)
    n_text: int = opt(32, "textual-view query tokens", ge=0, le=1024)
    heads: int = opt(8, "attention heads of the compressor", ge=1)
    dim: int = opt(0, "compressor width; 0 = the vision feature width", ge=0)


@dataclass
class LoraConfig:
    enabled: bool = opt(True, "train LoRA adapters on the LLM (else the LLM trains in full)")
    r: int = opt(8, "LoRA rank", ge=1)
    alpha: int = opt(16, "LoRA alpha", ge=1)
    dropout: float = opt(0.05, "LoRA dropout", ge=0.0, lt=1.0)
    target_regex: str = opt(
        r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)$",
        "regex of LLM module names that get adapters (the CLIP tower also has q_proj/v_proj)",
    )


@dataclass
class TrainConfig:
    backend: str = opt("ray", "where to train", choices=["ray", "local"])
    epochs: int = opt(10, "passes over the training triples", ge=1)
    max_steps: int = opt(0, "stop after this many optimizer steps (0 = no limit)", ge=0)
    max_minutes: float = opt(0.0, "stop after this many minutes (0 = no limit)", ge=0)
    batch_size: int = opt(32, "triples per micro-batch per worker", ge=1)
    grad_accum: int = opt(1, "gradient accumulation steps", ge=1)
    learning_rate: float = opt(1e-3, "peak learning rate", gt=0)
    weight_decay: float = opt(0.0, "AdamW weight decay", ge=0)
    warmup_steps: int = opt(0, "linear warm-up steps", ge=0)
    grad_clip: float = opt(1.0, "gradient-norm clipping (0 = off)", ge=0)
    num_negatives: int = opt(32, "sampled negatives per query (the negative sample size K)", ge=0)
    in_batch_negatives: bool = opt(True, "other queries' answers in the batch are negatives")
    knowledge_weight: float = opt(
        0.0, "lambda of L = L_task + lambda * L_knowledge", ge=0
    )
    both_directions: bool = opt(True, "train head prediction (t, r^-1, ?) as well as tail")
    eval_every: int = opt(0, "validate every N steps (0 = at the end of each epoch)", ge=0)
    val_max_queries: int = opt(500, "validation queries per evaluation (0 = all)", ge=0)
    seed: int = opt(0, "training seed")
    num_workers: int = opt(2, "Ray Train workers", ge=1)
    use_gpu: bool = opt(False, "one GPU per worker")
    cpus_per_worker: float = opt(0.9, "CPUs reserved per Ray Train worker", gt=0)
    threads_per_worker: int = opt(1, "torch intra-op threads per worker", ge=1)
    max_failures: int = opt(2, "worker failures tolerated (restart from last checkpoint)", ge=0)
    checkpoints_to_keep: int = opt(2, "checkpoints kept (best by val MRR + latest)", ge=1)
    mlflow_uri: str = opt("", "MLflow tracking URI (empty = no MLflow)")
    fail_at_step: int = opt(
        0, "fault-injection test hook: rank 0 of the first attempt exits at this step (0 = off)",
        ge=0,
    )


@dataclass
class DeepSpeedConfig:
    zero_stage: int = opt(2, "ZeRO stage", choices=[0, 1, 2, 3])
    precision: str = opt(
        "auto", "training precision; auto = fp32 on CPU, bf16 on GPU",
        choices=["auto", "fp32", "bf16", "fp16"],
    )
    offload_optimizer: bool = opt(False, "offload optimizer state to CPU (GPU mode)")
    offload_params: bool = opt(False, "offload parameters to CPU (ZeRO-3, GPU mode)")


@dataclass
class PruneConfig:
    method: str = opt(
        "none", "pruning method",
        choices=["none", "attention", "knowledge", "magnitude", "random"],
    )
    ratio: float = opt(0.3, "target share of prunable parameters (or of layers for attention)",
                       ge=0.0, lt=1.0)
    threshold: float = opt(
        0.8, "attention: prune layers whose in/out cosine similarity exceeds this (if ratio=0)",
        ge=-1.0, le=1.0,
    )
    importance: str = opt("squared", "knowledge importance form", choices=["squared", "taylor"])
    scope: str = opt("global", "rank units globally or per layer", choices=["global", "per_layer"])
    min_heads_per_layer: int = opt(1, "KV groups kept per layer at least", ge=1)
    min_neurons_per_layer: int = opt(8, "MLP neurons kept per layer at least", ge=1)
    steps: int = opt(1, "iterative schedule: prune/fine-tune rounds to reach the ratio", ge=1)
    calib_samples: int = opt(64, "calibration / importance samples", ge=1)
    compensation_rank: int = opt(0, "rank of the compensation map (0 = full d x d)", ge=0)
    ridge: float = opt(1e-3, "ridge of the compensation least squares", ge=0)
    finetune_steps: int = opt(100, "fine-tuning steps after each pruning round", ge=0)
    finetune_lr: float = opt(3e-4, "learning rate of the post-pruning fine-tuning", gt=0)
    knowledge_weight: float = opt(0.5, "lambda during post-pruning fine-tuning", ge=0)
    seed: int = opt(0, "seed of the random baseline and sampling")


@dataclass
class EvalConfig:
    split: str = opt("test", "split to rank", choices=["valid", "test"])
    batch_size: int = opt(256, "queries scored per matrix product", ge=1)
    max_queries: int = opt(0, "limit on queries per direction (0 = all)", ge=0)
    hits_at: list = opt([1, 3, 10], "k values of Hits@k")


@dataclass
class RayConfig:
    address: str = opt("", "Ray address; empty = RAY_ADDRESS or a local in-process cluster")
    num_cpus: int = opt(0, "CPUs of a local cluster (0 = all)", ge=0)
    data_actor_cpus: float = opt(0.5, "CPUs per Ray Data actor", gt=0)
    data_actors: int = opt(1, "vision-tower actors in the extract pool", ge=1)
    data_actor_gpus: float = opt(0.0, "GPUs per Ray Data actor", ge=0)
    data_batch_size: int = opt(32, "images per extract batch", ge=1)


@dataclass
class Config:
    """The whole configuration: one section per stage plus the run directory."""

    run_dir: str = opt("runs/default", "run directory (local path) holding every stage's output")
    seed: int = opt(0, "global seed")
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mvtc: MVTCConfig = field(default_factory=MVTCConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)

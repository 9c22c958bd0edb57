"""The typed configuration of every stage.

One frozen pydantic dataclass per section. Each field carries its default, its help text
(``description``, what ``elmm-ray config keys`` and the JSON Schema print) and its rules
(``ge``/``gt``/``le``/``lt``, ``Literal`` choices); ``None`` means "unset" (no limit, the
default location, off). Rules that involve several fields of a section are the section's
``model_validator``. :mod:`elmm_ray.config.load` validates a whole config in one pass and
lists every problem at once; ``dataclasses.replace`` re-validates.

Scalars are strict: a bool is not an int, a number is not a string, and a float field
accepts ints. (Loading also turns a whole float such as ``3.0`` into the int ``3``.)
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic.dataclasses import dataclass

from elmm_ray.config.fields import (
    RULE_ERROR,
    SECTION,
    Bool,
    Float,
    Int,
    OptStr,
    Str,
    _raise_problems,
)
from elmm_ray.config.presets import MODEL_PRESETS
from elmm_ray.config.schema_data import (
    EMBEDDING_SUFFIXES,
    DatasetConfig,
    ImagesConfig,
    SynthConfig,
    VisualEmbeddingsConfig,
)
from elmm_ray.config.schema_train import (
    OPTIONAL_LOGGERS,
    STORAGE_SCHEMES,
    DeepSpeedConfig,
    TrainConfig,
    max_workers,
    min_workers,
    worker_range,
)

PresetName = Literal[tuple(MODEL_PRESETS)]  # type: ignore[valid-type]
__all__ = ["RULE_ERROR", "EMBEDDING_SUFFIXES", "OPTIONAL_LOGGERS", "STORAGE_SCHEMES",
           "DatasetConfig", "DeepSpeedConfig", "ImagesConfig", "SynthConfig", "TrainConfig",
           "VisualEmbeddingsConfig", "max_workers", "min_workers", "worker_range"]


@dataclass(config=SECTION)
class ModelConfig:
    """The multimodal backbone (vision tower + LLM) and the scoring head."""

    preset: PresetName | None = Field(
        None, description="named set of model.* values applied before the YAML and the "
        "overrides (explicit keys win); null = none"
    )
    backbone: Str = Field(
        "tiny",
        description="'tiny' (random init from the sizes below) or a HF checkpoint id/local dir",
    )
    vision_tower: OptStr = Field(
        None, description="a standalone HF vision model (dir or hub id: CLIPVisionModel, "
        "SiglipVisionModel, or the vision half of a CLIPModel / SiglipModel) joined to the "
        "backbone's LLM with a fresh projector, preprocessing from its "
        "preprocessor_config.json; null = the backbone's own tower (tiny: random init)"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="parameter dtype"
    )
    vision_feature_layer: Int = Field(
        -2, description="vision tower hidden layer to use (LLaVA: -2)"
    )
    feature_pool: Int = Field(
        1, description="spatial pooling stride over the patch grid (1 = none)", ge=1, le=8
    )
    temperature: Float = Field(0.05, description="cosine-score temperature", gt=0)
    uncompressed: Bool = Field(
        False,
        description="baseline: all projected patch tokens in the prompt instead of MVTC tokens",
    )
    entity_repr: Literal["table", "encoder", "table+encoder"] = Field(
        "table", description="entity vectors: a learnable table row per entity; the model's "
        "own encoding of the entity's text + MVTC tokens of its images (a bi-encoder: what "
        "only a candidate's pictures show reaches its vector); or their normalised sum"
    )
    entity_image_adapter: Bool = Field(
        True, description="entity_repr=table: row + a shared adapter over the entity's "
        "pooled patch features (only when the model reads images)"
    )
    max_text_tokens: Int = Field(
        32, description="tokens kept of an entity's name + description", ge=4
    )
    trust_remote_code: Bool = Field(False, description="let a HF checkpoint run its own Python "
                                    "code when loaded (warned about; off: never)")
    # Tiny backbone sizes (ignored for a real checkpoint; vision_* / image_size / patch_size
    # also with model.vision_tower).
    vision_hidden: Int = Field(64, description="tiny CLIP width", ge=8)
    vision_layers: Int = Field(2, description="tiny CLIP layers", ge=1)
    vision_heads: Int = Field(4, description="tiny CLIP heads", ge=1)
    image_size: Int = Field(64, description="tiny CLIP input side (pixels)", ge=8)
    patch_size: Int = Field(16, description="tiny CLIP patch side (pixels)", ge=2)
    llm_hidden: Int = Field(128, description="tiny Llama width", ge=8)
    llm_layers: Int = Field(4, description="tiny Llama layers", ge=1)
    llm_heads: Int = Field(4, description="tiny Llama attention heads", ge=1)
    llm_kv_heads: Int = Field(2, description="tiny Llama key/value heads (GQA)", ge=1)
    llm_intermediate: Int = Field(256, description="tiny Llama MLP width", ge=8)
    vocab_size: Int = Field(2000, description="tiny tokenizer vocabulary size", ge=64)

    @model_validator(mode="after")
    def _rules(self) -> ModelConfig:
        if self.backbone != "tiny":
            return self
        p = []
        if self.llm_hidden % self.llm_heads:
            p.append(f"`model.llm_hidden` = {self.llm_hidden} is not divisible by "
                     f"`model.llm_heads` = {self.llm_heads}")
        if self.llm_heads % self.llm_kv_heads:
            p.append(f"`model.llm_heads` = {self.llm_heads} is not divisible by "
                     f"`model.llm_kv_heads` = {self.llm_kv_heads}")
        if self.vision_tower is None:  # else the tower's own geometry, checked when loaded
            p += self._tiny_vision_problems()
        _raise_problems(p)
        return self

    def _tiny_vision_problems(self) -> list[str]:
        p = []
        if self.vision_hidden % self.vision_heads:
            p.append(f"`model.vision_hidden` = {self.vision_hidden} is not divisible by "
                     f"`model.vision_heads` = {self.vision_heads}")
        if self.image_size % self.patch_size:
            p.append(f"`model.image_size` = {self.image_size} is not divisible by "
                     f"`model.patch_size` = {self.patch_size}")
        grid = self.image_size // self.patch_size
        if grid % self.feature_pool:
            p.append(f"`model.feature_pool` = {self.feature_pool} does not divide the "
                     f"{grid}x{grid} patch grid of `model.image_size`/`model.patch_size`")
        return p


@dataclass(config=SECTION)
class MVTCConfig:
    """The multi-view visual token compressor."""

    n_visual: Int = Field(32, description="visual-view query tokens", ge=0, le=1024)
    n_text: Int = Field(32, description="textual-view query tokens", ge=0, le=1024)
    heads: Int = Field(8, description="attention heads of the compressor", ge=1)
    dim: Int | None = Field(
        None, description="compressor width; null = the vision feature width", ge=1
    )

    @model_validator(mode="after")
    def _rules(self) -> MVTCConfig:
        if self.dim is not None and self.dim % self.heads:
            _raise_problems([f"`mvtc.dim` = {self.dim} is not divisible by "
                             f"`mvtc.heads` = {self.heads}"])
        return self


@dataclass(config=SECTION)
class LoraConfig:
    """LoRA adapters on the LLM."""

    enabled: Bool = Field(
        True, description="train LoRA adapters on the LLM (else the LLM trains in full)"
    )
    r: Int = Field(8, description="LoRA rank", ge=1)
    alpha: Int = Field(16, description="LoRA alpha", ge=1)
    dropout: Float = Field(0.05, description="LoRA dropout", ge=0.0, lt=1.0)
    target_regex: Str = Field(
        r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)$",
        description="regex of LLM module names that get adapters "
        "(the CLIP tower also has q_proj/v_proj)",
    )


@dataclass(config=SECTION)
class PruneConfig:
    """Structured pruning of the LLM and the fine-tuning after it."""

    method: Literal["none", "attention", "knowledge", "magnitude", "random"] = Field(
        "none", description="pruning method"
    )
    ratio: Float = Field(
        0.3, description="target share of prunable parameters (or of layers for attention)",
        ge=0.0, lt=1.0,
    )
    threshold: Float = Field(
        0.8, description="attention: prune layers whose in/out cosine similarity exceeds "
        "this (if ratio=0)", ge=-1.0, le=1.0,
    )
    importance: Literal["squared", "taylor"] = Field(
        "squared", description="knowledge importance form"
    )
    scope: Literal["global", "per_layer"] = Field(
        "global", description="rank units globally or per layer"
    )
    min_heads_per_layer: Int = Field(1, description="KV groups kept per layer at least", ge=1)
    min_neurons_per_layer: Int = Field(
        8, description="MLP neurons kept per layer at least", ge=1
    )
    steps: Int = Field(
        1, description="iterative schedule: prune/fine-tune rounds to reach the ratio", ge=1
    )
    calib_samples: Int = Field(64, description="calibration / importance samples", ge=1)
    compensation_rank: Int | None = Field(
        None, description="rank of the compensation map (null = full d x d)", ge=1
    )
    compensation: Literal["linear", "linear_mean"] = Field(
        "linear", description="attention: map replacing a removed attention sublayer; "
        "`linear` = ELMM's h @ W + b of the token's own state; `linear_mean` = plus a linear "
        "map of the causal running mean of the states up to the token (token mixing, one more "
        "d x d product per token, still no attention; bench/bench_compensation.py measures both)"
    )
    ridge: Float = Field(1e-3, description="ridge of the compensation least squares", ge=0)
    finetune_steps: Int = Field(
        100, description="fine-tuning steps after each pruning round", ge=0
    )
    finetune_lr: Float = Field(
        1e-4, description="learning rate of the post-pruning fine-tuning (3e-4 lost ~6 % of "
        "Hits@1 on the synthetic KG, the unpruned control too: bench/results/prune_knowledge*)",
        gt=0,
    )
    knowledge_weight: Float = Field(
        0.5, description="lambda during post-pruning fine-tuning", ge=0
    )
    seed: Int = Field(0, description="seed of the random baseline and sampling")


@dataclass(config=SECTION)
class ExportConfig:
    """The exported model directory (``elmm-ray export``)."""

    checkpoint: Literal["best", "last"] = Field(
        "last", description="weights to export: `last` = the end of training; `best` = the "
        "validation round with the highest val MRR (kept by the training loop under "
        "`train/best`). A pruned run: `last` = the pruned model after its final fine-tuning "
        "(`prune/model`), `best` = the best validation round of the last pruning round's "
        "fine-tuning (`prune/finetune_<k>/best`, on the same pruned backbone)"
    )
    license: Str = Field(
        "other", description="license id in the model card's front matter (the backbone's "
        "and the dataset's terms apply as well)"
    )


@dataclass(config=SECTION)
class EvalConfig:
    """Filtered ranking evaluation."""

    split: Literal["valid", "test"] = Field("test", description="split to rank")
    batch_size: Int = Field(256, description="queries scored per matrix product", ge=1)
    max_queries: Int | None = Field(
        None, description="limit on queries per direction (null = all)", ge=1
    )
    hits_at: list[Int] = Field(
        default_factory=lambda: [1, 3, 10], description="k values of Hits@k (non-empty, each >= 1)"
    )
    workers: Int | None = Field(
        None, ge=0, description="Ray workers that each encode and rank a slice of the queries "
        "(resources as a training worker: train.cpus_per_worker, a GPU with train.use_gpu); "
        "0 = in this process; null = train.num_workers with train.backend=ray, else 0")

    @field_validator("hits_at")
    @classmethod
    def _positive(cls, hits: list[int]) -> list[int]:
        if not hits or any(k < 1 for k in hits):
            _raise_problems([f"`eval.hits_at` = {hits!r} must be a non-empty list of "
                             "positive integers"])
        return hits


@dataclass(config=SECTION)
class RayConfig:
    """The Ray cluster and the Ray Data actor pools."""

    address: OptStr = Field(
        None, description="Ray address; null = RAY_ADDRESS or a local in-process cluster"
    )
    num_cpus: Int | None = Field(None, description="CPUs of a local cluster (null = all)", ge=1)
    data_actor_cpus: Float = Field(0.5, description="CPUs per Ray Data actor", gt=0)
    data_actors: Int = Field(1, description="vision-tower actors in the extract pool", ge=1)
    data_actor_gpus: Float = Field(0.0, description="GPUs per Ray Data actor", ge=0)
    data_batch_size: Int = Field(32, description="images per extract batch", ge=1)
    data_part_rows: Int = Field(
        0, description="images per committed feature-store part (0: parts of ~64 MiB of "
        "features); a killed extraction redoes only its uncommitted parts", ge=0
    )
    include_dashboard: Bool = Field(
        True, description="a local cluster starts Ray's dashboard on 127.0.0.1: Ray Train's "
        "placement-group cleaner needs its State API (without it a stopped Tune trial keeps "
        "its workers' CPUs reserved, and the cleaner logs a warning every 2 s)"
    )


@dataclass(config=SECTION)
class TuneConfig:
    """Ray Tune sweeps (``elmm-ray tune CONFIG --space SPACE``); a space file may set any of
    these keys too (the space wins)."""

    search: Literal["random", "grid", "optuna", "optuna-nsga2"] = Field(
        "random", description="search algorithm: random sampling, the grid of every `choice` "
        "(times num_samples), Optuna TPE on `metric`, or Optuna NSGA-II on `objectives`"
    )
    scheduler: Literal["none", "asha"] = Field(
        "asha", description="trial scheduler: ASHA stops weak trials on `metric` after each "
        "validation round"
    )
    grace_period: Int = Field(
        1, description="validation rounds every trial runs before ASHA may stop it", ge=1
    )
    reduction_factor: Int = Field(2, description="ASHA's reduction factor", ge=2)
    num_samples: Int = Field(8, description="trials (grid: repeats of the whole grid)", ge=1)
    metric: Str = Field("val_mrr", description="what ASHA, TPE and `best` optimise")
    mode: Literal["max", "min"] = Field("max", description="maximise or minimise `metric`")
    objectives: list[Str] = Field(
        default_factory=lambda: ["val_mrr:max", "visual_tokens:min", "latency_ms:min",
                                 "llm_params:min"],
        description="metric:mode pairs of the Pareto front (and of NSGA-II); a best-config "
        "YAML is written for each",
    )
    max_concurrent_trials: Int = Field(1, description="trials running at once", ge=1)
    trial_backend: Literal["auto", "ray", "local"] = Field(
        "auto", description="where a trial trains: `local` in the trial's own process on CPU "
        "(the local loop with the same global batch: no Ray Train worker group, whose start-up "
        "is ~10 s per trial), `ray` on Ray Train workers (DeepSpeed ZeRO), `auto` = local when "
        "the trial trains on one CPU worker (train.num_workers=1, train.use_gpu=false) and "
        "training is not a shared stage (a pruning sweep's base keeps train.backend), else "
        "train.backend. It becomes the whole sweep's train.backend (the best-config YAMLs "
        "too). Local trials run one after another in one reused Tune actor (Linux)"
    )
    trial_cpus: Float | None = Field(
        None, description="CPUs reserved by a trial's own process (null: when it trains "
        "locally (tune.trial_backend), one training worker's train.cpus_per_worker or "
        "train.threads_per_worker, at least 1; on ray 0.01, its Train workers reserve their "
        "own)", gt=0
    )
    latency_batch: Int = Field(32, description="queries in the fixed latency batch", ge=1)
    latency_repeats: Int = Field(7, description="timed passes (median) of the latency batch",
                                 ge=1)
    seed: Int = Field(0, description="seed of the search algorithm")

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, objectives: list[str]) -> list[str]:
        bad = [o for o in objectives if o.count(":") != 1 or o.split(":")[1] not in ("max", "min")]
        if not objectives or bad:
            _raise_problems([f"`tune.objectives` = {objectives!r}: give a non-empty list of "
                             "'metric:max' or 'metric:min'"])
        return objectives

    @model_validator(mode="after")
    def _rules(self) -> TuneConfig:
        if self.search == "optuna-nsga2" and self.scheduler != "none":
            _raise_problems(["`tune.search` = 'optuna-nsga2' needs `tune.scheduler` = 'none' "
                             "(a stopped trial has no cost metrics for the multi-objective "
                             "search)"])
        return self


@dataclass(config=SECTION)
class TrackingConfig:
    """Experiment tracking for the MLflow and W&B loggers of ``train.loggers``: one tracking
    run per run directory and config, reopened by every stage and by a resumed run."""

    experiment: Str = Field("elmm-ray", description="MLflow experiment (created if missing)")
    run_name: OptStr = Field(None, description="tracking run name (null: the run directory's "
                             "name)")
    mlflow_uri: OptStr = Field(
        None, description="MLflow tracking URI: a server (http://host:5000) or a local store "
        "as an absolute URI (sqlite:////abs/mlflow.db); null: sqlite:///<run_dir>/mlflow.db. "
        "Ray Train workers on other nodes open it too: a local store must be on shared storage"
    )
    wandb_project: Str = Field("elmm-ray", description="W&B project")
    wandb_entity: OptStr = Field(None, description="W&B entity (null: your default entity)")
    wandb_mode: Literal["online", "offline"] = Field(
        "online", description="W&B mode; offline writes <wandb_dir>/wandb/offline-run-* "
        "folders for `wandb sync`"
    )
    wandb_dir: OptStr = Field(None, description="folder W&B writes into (null: the run "
                              "directory)")

    @field_validator("mlflow_uri")
    @classmethod
    def _mlflow_uri(cls, uri: str | None) -> str | None:
        path = uri or "/"
        for scheme in ("sqlite:///", "file://"):  # sqlite:////abs, file:///abs
            path = path.removeprefix(scheme)
        if "://" not in path and not path.startswith("/"):
            _raise_problems([f"`tracking.mlflow_uri` = {uri!r} is not an absolute local store "
                             "(every process, Ray Train workers too, must open the same one): "
                             "give e.g. sqlite:////abs/path/mlflow.db (four slashes)"])
        return uri


@dataclass(config=SECTION)
class Config:
    """The whole configuration: one section per stage plus the run directory."""

    run_dir: Str = Field(
        "runs/default", description="run directory holding every stage's output: a local "
        "path, or s3://bucket/prefix, gs://bucket/prefix (stages work in a local mirror, "
        "$ELMM_RUN_CACHE or ~/.cache/elmm_ray/runs, pushed after every stage)"
    )
    storage_endpoint: OptStr = Field(
        None, description="the endpoint of an S3-compatible server (MinIO, Ceph, ...) for "
        "every s3:// location of the run (run_dir, train.storage_path, images.feature_store), "
        "e.g. http://10.0.0.5:9000; null: AWS_ENDPOINT_URL where set, else AWS"
    )
    seed: Int = Field(0, description="global seed")
    dataset: DatasetConfig = Field(default_factory=DatasetConfig, description="the dataset")
    images: ImagesConfig = Field(default_factory=ImagesConfig,
                                 description="image shards and the feature store")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the model")
    mvtc: MVTCConfig = Field(default_factory=MVTCConfig,
                             description="the multi-view visual token compressor")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters")
    train: TrainConfig = Field(default_factory=TrainConfig, description="training")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig,
                                       description="DeepSpeed ZeRO")
    prune: PruneConfig = Field(default_factory=PruneConfig, description="pruning")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="evaluation")
    export: ExportConfig = Field(default_factory=ExportConfig,
                                 description="the exported model directory")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="Ray Tune sweeps")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig,
                                     description="experiment tracking (MLflow, W&B)")

    @model_validator(mode="after")
    def _storage_rules(self) -> Config:
        problems = []
        schemes = {key: value.split("://", 1)[0] for key, value in (
            ("run_dir", self.run_dir), ("train.storage_path", self.train.storage_path),
            ("images.feature_store", self.images.feature_store)) if value and "://" in value}
        if schemes.get("run_dir", "s3") not in STORAGE_SCHEMES:
            problems.append(f"`run_dir` = {self.run_dir!r}: unknown scheme; use a path or one "
                            f"of {', '.join(s + '://' for s in STORAGE_SCHEMES)}")
        if self.storage_endpoint and "s3" not in schemes.values():
            problems.append(f"`storage_endpoint` = {self.storage_endpoint!r} is for s3:// "
                            "locations, and run_dir, train.storage_path and "
                            "images.feature_store name none; unset it")
        elif self.storage_endpoint and "://" not in self.storage_endpoint:
            problems.append(f"`storage_endpoint` = {self.storage_endpoint!r}: give the scheme "
                            "too, e.g. http://127.0.0.1:9000 or https://s3.example.com")
        _raise_problems(problems)
        return self

"""The training side of the config schema: ``train`` (schedule, loss, validation, Ray
Train workers, elasticity and fault tolerance) and ``deepspeed``."""

from __future__ import annotations

import importlib.util
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator
from pydantic.dataclasses import dataclass

from elmm_ray.config.fields import (
    SECTION,
    Bool,
    Float,
    Int,
    OptStr,
    WorkerCount,
    _no_bool,
    _raise_problems,
)

# Object storage Ray Train writes to through pyarrow.fs (gs and gcs: Google Cloud Storage).
STORAGE_SCHEMES = ("s3", "gs", "gcs")
Logger = Literal["jsonl", "tensorboard", "mlflow", "wandb"]
OPTIONAL_LOGGERS = ("mlflow", "wandb")  # extras of the same name; checked when loading


def worker_range(train: TrainConfig) -> tuple[int, int]:
    """``train.num_workers`` as (MIN, MAX): equal for a fixed count."""
    count = train.num_workers
    return (count, count) if isinstance(count, int) else (int(count[0]), int(count[1]))


def max_workers(train: TrainConfig) -> int:
    """The most Ray Train workers a run of ``train`` may have."""
    return worker_range(train)[1]


def min_workers(train: TrainConfig) -> int:
    """The fewest Ray Train workers a run of ``train`` goes on with."""
    return worker_range(train)[0]


@dataclass(config=SECTION)
class TrainConfig:
    """Training: schedule, loss, validation, Ray Train workers and fault tolerance."""

    backend: Literal["ray", "local"] = Field("ray", description="where to train")
    epochs: Int = Field(10, description="passes over the training triples", ge=1)
    max_steps: Int | None = Field(
        None, description="stop after this many optimizer steps (null = no limit)", ge=1
    )
    max_minutes: Float | None = Field(
        None, description="stop after this many minutes (null = no limit)", gt=0
    )
    global_batch_size: Int = Field(
        64, description="training queries per optimizer step, over all workers: the objective "
        "(in-batch answers and sampled/hard negatives are those of the whole batch) is the same "
        "at any worker count; each worker encodes about global_batch_size / (grad_accum x "
        "workers) queries per micro-step", ge=1)
    grad_accum: Int = Field(
        1, description="micro-steps per optimizer step: the global batch is split into this "
        "many contrastive batches of global_batch_size / grad_accum queries (in-batch "
        "negatives come from one micro-step), whose gradients add up", ge=1)
    learning_rate: Float = Field(1e-3, description="peak learning rate", gt=0)
    weight_decay: Float = Field(0.0, description="AdamW weight decay", ge=0)
    warmup_steps: Int = Field(0, description="linear warm-up steps", ge=0)
    grad_clip: Float = Field(1.0, description="gradient-norm clipping (0 = off)", ge=0)
    num_negatives: Int = Field(
        32, description="sampled negatives per query (the negative sample size K)", ge=0
    )
    hard_negatives: Int = Field(
        0, description="more negatives per batch: the queries' highest-scoring non-answers "
        "(with an entity encoder: against its cache, see entity_refresh_every)", ge=0
    )
    in_batch_negatives: Bool = Field(
        True, description="other queries' answers in the batch are negatives"
    )
    knowledge_weight: Float = Field(
        0.0, description="lambda of L = L_task + lambda * L_knowledge", ge=0
    )
    both_directions: Bool = Field(
        True, description="train head prediction (t, r^-1, ?) as well as tail"
    )
    eval_every: Int | None = Field(
        None, description="validate every N steps (null = at the end of each epoch)", ge=1
    )
    entity_refresh_every: Int | None = Field(
        None, description="model.entity_repr with an encoder: re-encode every entity (the "
        "cache that L_knowledge scores against) every N steps, sharded over the workers; it "
        "is also refreshed at the start and before every validation (null: only then)", ge=1
    )
    val_max_queries: Int | None = Field(
        500, description="validation queries per evaluation (null = all)", ge=1
    )
    seed: Int = Field(0, description="training seed")
    num_workers: WorkerCount = Field(
        2, description="Ray Train workers: N, or [MIN, MAX] for an elastic run (it starts with "
        "what the cluster can give, at least MIN, and grows to MAX as nodes join; a lost node "
        "resumes on the workers left); not part of the run's identity: a checkpoint resumes "
        "at any worker count")
    use_gpu: Bool = Field(False, description="one GPU per worker")
    cpus_per_worker: Float = Field(0.9, description="CPUs reserved per Ray Train worker", gt=0)
    threads_per_worker: Int = Field(
        1, description="torch intra-op threads per Ray Train worker and of local training "
        "(fixed, so that a config gives the same figures in any process)", ge=1)
    max_failures: Int = Field(
        2, description="worker failures tolerated (restart from last checkpoint)", ge=0
    )
    max_preemptions: Int = Field(
        -1, description="node preemptions tolerated (spot reclaims, drained nodes; counted "
        "apart from max_failures; -1 = no limit): each resumes from the just-in-time "
        "checkpoint written when the node's drain was announced", ge=-1)
    resize_interval_s: Float = Field(
        60.0, description="elastic runs (num_workers [MIN, MAX]): how often Ray Train checks "
        "whether more workers can start; the run grows by restarting from its latest "
        "checkpoint", ge=0)
    checkpoints_to_keep: Int = Field(
        2, description="checkpoints kept (best by val MRR + latest)", ge=1
    )
    loggers: list[Logger] = Field(
        default_factory=lambda: ["jsonl", "tensorboard"],
        description="where training metrics go: jsonl (<train dir>/metrics.jsonl), tensorboard "
        "(<train dir>/tensorboard), mlflow, wandb (optional extras: pip install "
        "'elmm-ray[mlflow]' / 'elmm-ray[wandb]'; settings under `tracking`); mlflow and wandb "
        "also receive the resolved config, evaluation results and artifacts of every stage"
    )
    step_delay_s: Float = Field(
        0.0, description="fault-test hook: sleep this long after every optimizer step (a "
        "slower model, so that a test's faults land mid-run; 0 = off)", ge=0)
    fail_at_step: Int | None = Field(
        None, description="fault-injection test hook: rank 0 of the first attempt exits at "
        "this step (null = off)", ge=1,
    )
    storage_path: OptStr = Field(
        None, description="Ray Train storage (checkpoints, resume): a local or shared path, "
        "or s3://bucket/prefix, gs://bucket/prefix (pyarrow.fs; every node needs access); "
        "null: <run_dir>/ray_train"
    )
    @model_validator(mode="after")
    def _rules(self) -> TrainConfig:
        problems = []
        contrastive, most = self.global_batch_size // self.grad_accum, max_workers(self)
        if self.global_batch_size % self.grad_accum:
            problems.append(f"`train.global_batch_size` = {self.global_batch_size} is not a "
                            f"multiple of `train.grad_accum` = {self.grad_accum}")
        elif contrastive < most:
            problems.append(f"`train.global_batch_size` / `train.grad_accum` = {contrastive} "
                            f"queries per micro-step cannot feed {most} workers "
                            "(`train.num_workers`): every worker needs at least one")
        scheme = self.storage_path.split("://", 1)[0] if self.storage_path and (
            "://" in self.storage_path) else None
        if scheme is not None and scheme not in STORAGE_SCHEMES:
            problems.append(f"`train.storage_path` = {self.storage_path!r}: unknown scheme "
                            f"{scheme!r}; use a path or one of "
                            f"{', '.join(s + '://' for s in STORAGE_SCHEMES)}")
        _raise_problems(problems)
        return self


    @field_validator("loggers")
    @classmethod
    def _loggers(cls, loggers: list[str]) -> list[str]:
        _raise_problems([f"`train.loggers` = {loggers!r} names a logger twice"]
                        if len(set(loggers)) != len(loggers) else [
            f"`train.loggers` names {name} but the {name} package is not installed: pip "
            f"install 'elmm-ray[{name}]' (or drop {name} from train.loggers)"
            for name in loggers if name in OPTIONAL_LOGGERS and not importlib.util.find_spec(name)])
        return loggers


@dataclass(config=SECTION)
class DeepSpeedConfig:
    """DeepSpeed ZeRO inside the Ray Train workers."""

    zero_stage: Annotated[Literal[0, 1, 2, 3], BeforeValidator(_no_bool)] = Field(
        2, description="ZeRO stage"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="training precision; auto = fp32 on CPU, bf16 on GPU"
    )
    offload_optimizer: Bool = Field(
        False, description="offload optimizer state to CPU (GPU mode)"
    )
    offload_params: Bool = Field(False, description="offload parameters to CPU (ZeRO-3, GPU mode)")

    @model_validator(mode="after")
    def _rules(self) -> DeepSpeedConfig:
        if self.offload_params and self.zero_stage != 3:
            _raise_problems(["`deepspeed.offload_params` = true needs `deepspeed.zero_stage` = 3"])
        return self

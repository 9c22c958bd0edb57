"""The one training loop: training and post-pruning fine-tuning, local or on Ray Train.

:func:`run_loop` is the loop body. What differs between backends sits behind two adapters:
- an **engine** (backward / step / learning rate / memory): :class:`TorchEngine` (AdamW,
  warm-up + cosine, accumulation, clipping: the local backend) or :class:`DeepSpeedEngine`
  (a ``deepspeed.initialize`` engine: ZeRO-2/3 on Ray Train workers);
- a **session** (rank, world size, collectives, reporting, checkpoints, preemption):
  :class:`LocalSession` (one process) or :class:`RaySession` (``ray.train.report`` with a
  portable checkpoint: resumable exactly, at any world size).
Both live in :mod:`elmm_ray.train.backends`.

:func:`train_local` runs the loop in this process; :func:`train_loop_per_worker` is the
function a ``TorchTrainer`` runs on every worker (see :mod:`elmm_ray.train.trainer`). Both
build the model the same way (:mod:`elmm_ray.train.context`); a :class:`LoopSpec` says
whether it is a fresh model or a saved pruned one, and where outputs go.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from elmm_ray.config import Config, config_from_dict
from elmm_ray.console import LoopProgress
from elmm_ray.data.dataset import load_dataset
from elmm_ray.data.kg import KnowledgeGraph
from elmm_ray.eval.evaluate import encode_all_entities, evaluate_model, pad_rows, shard_of
from elmm_ray.faults import fault_point
from elmm_ray.layout import BEST_RECORD, BEST_SUBDIR, RunLayout, read_json, write_json_atomic
from elmm_ray.models.lora import save_trainable
from elmm_ray.tracking import drop_records_after
from elmm_ray.train.backends import (
    DeepSpeedEngine,
    LocalSession,
    RaySession,
    TorchEngine,
    checkpoint_due,
    hold_until_preempted,
    lr_lambda,
    resume_line,
    resumed_state,
)
from elmm_ray.train.checkpoint_integrity import verify_checkpoint
from elmm_ray.train.context import (
    ModelContext,
    build_context,
    load_pruned_context,
    prepare_finetune,
)
from elmm_ray.train.metrics import MetricsLogger
from elmm_ray.train.portable import load_optimizer, load_weights
from elmm_ray.train.step import QueryBatches, compute_loss

FAULT_MARKER = ".fault_injected"
STEP_LEDGER = "steps.log"
MODEL_SUBDIR = "model"


@dataclass(frozen=True)
class LoopSpec:
    """What one training run trains and where it writes, relative to the run directory.

    ``init_model``: a saved pruned model directory to fine-tune (fresh LoRA adapters on the
    pruned backbone, compensation maps trainable, its entity table kept); ``None`` trains
    the fresh model of the config, its entity table initialised from each entity's own
    encoding. ``run_name`` names the Ray Train run (its checkpoints, hence resume)."""

    out_subdir: str = "train"
    init_model: str | None = None
    run_name: str = "train"


def optimizer_steps_per_epoch(cfg: Config, queries: np.ndarray) -> int:
    """Optimizer steps per epoch: whole global batches of ``train.global_batch_size``."""
    tc = cfg.train
    return QueryBatches(queries, tc.global_batch_size // tc.grad_accum, tc.seed,
                        tc.grad_accum).steps_per_epoch


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    steps = cfg.train.epochs * steps_per_epoch
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


def init_entity_table(ctx: ModelContext, batch_size: int, layout: RunLayout | None = None
                      ) -> None:
    """Each entity's own encoding: read from ``<run_dir>/entity_init.safetensors`` when the
    entity-init stage wrote it, else computed here."""
    path = layout.entity_init if layout else None
    if path is not None and path.is_file():
        from safetensors.torch import load_file

        vectors = load_file(str(path))["entity_table"]
    else:
        vectors = encode_all_entities(ctx.model, ctx.collator, ctx.features, batch_size)
    ctx.model.init_entity_table(vectors)


def prepare_context(cfg: Config, kg: KnowledgeGraph, spec: LoopSpec) -> ModelContext:
    """The model a run of ``spec`` starts from, ready to train. Ray Train workers take the
    entity table from the entity-init stage (the train stage depends on it); the local
    backend computes it in-process (its train stage does not, so a file there may be
    another config's)."""
    torch.manual_seed(cfg.train.seed)
    if spec.init_model:
        ctx = load_pruned_context(cfg, kg, Path(spec.init_model))
        prepare_finetune(ctx.model, cfg)
        return ctx
    ctx = build_context(cfg, kg)
    if ctx.model.entity_repr != "encoder":  # the encoder alone has no rows
        layout = RunLayout.of(cfg) if cfg.train.backend == "ray" else None
        init_entity_table(ctx, cfg.eval.batch_size, layout)
    return ctx


def refresh_entity_cache(ctx: ModelContext, batch_size: int, session) -> None:
    """Re-encode every entity into the model's cache, sharded over the ranks: each encodes its
    whole batches of the one-process order (:func:`shard_of`; a rank with fewer runs dummy
    forwards, so every rank runs the same forwards, as ZeRO-3 needs), then all gather: the
    cache is the one process's at any world size."""
    model = ctx.model
    total = model.num_entities
    part = shard_of(total, session.rank, session.world, batch_size)
    mine = encode_all_entities(model, ctx.collator, ctx.features, batch_size,
                               torch.arange(part.start, part.stop))
    for _ in range(part.pad_batches):
        encode_all_entities(model, ctx.collator, ctx.features, batch_size, torch.arange(1))
    model.set_entity_cache(session.all_gather(pad_rows(mine, part.rows))[:total])


def _maybe_inject_fault(cfg: Config, rank: int, step: int, out: Path) -> None:
    """Test hook (``train.fail_at_step``): rank 0 of the first attempt dies at that step,
    after a few of Ray Train's health-check intervals, so that the controller has registered
    the checkpoint reported before (a death right after a report can beat it)."""
    marker = out / FAULT_MARKER
    if not cfg.train.fail_at_step or rank or step != cfg.train.fail_at_step or marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"worker died on purpose at step {step}\n")
    time.sleep(4 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")))
    os._exit(1)


def save_best(model: torch.nn.Module, out: Path, record: dict, rank: int, gather=None) -> None:
    """Keep the trainable weights of a new best validation round in ``<out>/best`` with its
    record (``best.json``: step, epoch, val MRR, val Hits@1). Every rank calls it (ZeRO-3
    gathers the partitioned weights); rank 0 writes aside, then swaps the folder in."""
    params = [p for p in model.parameters() if p.requires_grad]
    with gather(params) if gather else contextlib.nullcontext():
        if rank != 0:
            return
        best, tmp = out / BEST_SUBDIR, out / f".{BEST_SUBDIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_trainable(model, tmp)
        write_json_atomic(tmp / BEST_RECORD, {
            key: record[key] for key in ("step", "epoch", "val_mrr", "val_hits1", "seconds")})
        # the old best is moved aside, not deleted, until the new one is in place
        old = out / f".{BEST_SUBDIR}.old"
        shutil.rmtree(old, ignore_errors=True)
        if best.exists():
            os.replace(best, old)
        os.replace(tmp, best)
        shutil.rmtree(old, ignore_errors=True)


def _kept_best_mrr(out: Path, rank: int) -> float | None:
    """Val MRR of the best round already kept in ``<out>/best`` (a resumed run; a best
    moved aside by a save that died before swapping the new one in is put back by rank 0,
    and read from where it is by the others)."""
    old, best = out / f".{BEST_SUBDIR}.old", out / BEST_SUBDIR
    if old.is_dir() and not best.exists():
        if rank != 0:
            record = old / BEST_RECORD
            return float(read_json(record)["val_mrr"]) if record.is_file() else None
        os.replace(old, best)
    record = best / BEST_RECORD
    return float(read_json(record)["val_mrr"]) if record.is_file() else None


# --- the loop -----------------------------------------------------------------------------------


def run_loop(cfg: Config, kg: KnowledgeGraph, ctx: ModelContext, queries: np.ndarray,
             engine, session, out: Path, *, progress: Callable[[dict], None] | None = None,
             gather=None, after_best: Callable[[], None] | None = None,
             startup: dict[str, float] | None = None) -> dict:
    """Train ``ctx.model`` on ``queries`` with ``engine``; validate every
    ``train.eval_every`` steps (default: each epoch) and report through ``session``; save
    the trainable weights to ``<out>/model`` and the summary (steps, seconds, losses,
    history) to ``<out>/summary.json``, and returns it.
    ``progress``: called on rank 0 after every step and validation round with
    ``{step, steps, epoch, loss | val_mrr}`` (the console's progress, or a Ray queue);
    ``gather``: a context manager that gathers partitioned parameters for a save (ZeRO-3).
    Each validation round with a new highest val MRR also saves the trainable weights to
    ``<out>/best`` (:func:`save_best`), then rank 0 calls ``after_best`` (a remote run
    directory: pushed with the round, so a rank 0 restarted on another node keeps it).
    A resumed session (``session.resumed_state``) continues from its step at any world size
    and says so (``progress`` gets ``{"event": "resumed", "text": ...}``; the summary's
    ``resumes`` lists every resume). ``startup``: this attempt's start-up marks (epoch
    seconds, in order: a Ray Train worker's process start, imports, data, model, engine);
    the summary keeps them with ``first_step`` and ``last_step`` added."""
    tc, model = cfg.train, ctx.model
    rank, world = session.rank, session.world
    batches = QueryBatches(queries, tc.global_batch_size // tc.grad_accum, tc.seed,
                           tc.grad_accum)
    steps = total_steps(cfg, batches.steps_per_epoch)
    # Sampled negatives are the global batch's: every rank draws the same ones.
    generator = torch.Generator().manual_seed(tc.seed * 1000)
    known = kg.filter_index(("train",))
    step, history, seconds_before, eval_seconds, losses, resumes = 0, [], 0.0, 0.0, [], []
    preemptions: list[dict] = []
    noticed: list | None = None  # the preempted nodes a checkpoint was written for
    step_seconds: collections.deque[float] = collections.deque(maxlen=20)  # recent steps
    resumed = session.resumed_state
    best_mrr = _kept_best_mrr(out, rank) if resumed else None
    if not resumed and rank == 0:  # a fresh run: an older run's best is not this one's
        shutil.rmtree(out / BEST_SUBDIR, ignore_errors=True)
    elif resumed:
        batches.load_state_dict(resumed["data"])
        generator.set_state(resumed["generator"])
        step, history = int(resumed["step"]), list(resumed["history"])
        seconds_before, eval_seconds = float(resumed["seconds"]), float(resumed["eval_seconds"])
        losses = list(resumed["losses"])  # every step's loss, not only these
        preemptions = list(resumed.get("preemptions", []))
        resumes = [*resumed.get("resumes", []), {"step": step, "from_workers":
                                                 int(resumed.get("world", world)),
                                                 "workers": world}]
        if resumed.get("torch_rng") is not None:  # the dropout masks of an uninterrupted run
            torch.set_rng_state(resumed["torch_rng"])
        if resumed.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(resumed["cuda_rng"])
        if rank == 0:  # records a killed attempt logged after its last checkpoint
            drop_records_after(out, step)
            if progress is not None:
                progress({"event": "resumed", "text": resume_line(resumes[-1])})
    logger = MetricsLogger(cfg, out, enabled=rank == 0, resume=bool(resumed))
    # Every optimizer step each attempt takes, one line each (rank 0): a step redone after a
    # failure or preemption appears twice.
    ledger = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        ledger = open(out / STEP_LEDGER, "a" if resumed else "w")  # noqa: SIM115
        ledger.write(f"# attempt workers={world} from={step} at={time.time():.3f}\n")
        ledger.flush()
    eval_every = tc.eval_every or batches.steps_per_epoch
    samples_per_step = tc.global_batch_size
    start = time.perf_counter() - seconds_before
    memory: dict = {}
    window = []
    show = progress if rank == 0 else None

    def validate(epoch: int, parts) -> None:
        """Validation round: log, and report with the state a resume needs."""
        nonlocal eval_seconds, window, best_mrr
        eval_start = time.perf_counter()
        # Each rank ranks its share of the validation queries (no duplicate work).
        if model.encodes_entities:
            refresh_entity_cache(ctx, cfg.eval.batch_size, session)
        val = evaluate_model(model, ctx.collator, ctx.features, kg, split="valid",
                             batch_size=cfg.eval.batch_size, max_queries=tc.val_max_queries,
                             ks=cfg.eval.hits_at, shard=(rank, world),
                             all_gather=session.all_gather, refresh=False)
        eval_seconds += time.perf_counter() - eval_start
        record = {"step": step, "epoch": epoch, "loss": float(np.mean(window)),
                  "task_loss": parts.task, "knowledge_loss": parts.knowledge, "lr": engine.lr,
                  "val_mrr": val["overall"]["mrr"], "val_hits1": val["overall"].get("hits@1"),
                  "seconds": time.perf_counter() - start, "workers": world, **memory}
        record["train_seconds"] = record["seconds"] - eval_seconds
        history.append(record)
        logger.log(record)
        if show:
            show({"step": step, "steps": steps, "epoch": epoch, "val_mrr": record["val_mrr"]})
        if session.any_rank(best_mrr is None or record["val_mrr"] > best_mrr):
            best_mrr = record["val_mrr"]
            save_best(model, out, record, rank, gather)
            if rank == 0 and after_best is not None:
                after_best()
        window = []
        session.report(record, loop_state())

    def loop_state() -> dict:
        """What a resume needs (at any world size): see :mod:`elmm_ray.train.portable`."""
        return {"data": batches.state_dict(), "generator": generator.get_state(), "step": step,
                "samples_consumed": batches.samples_consumed, "history": history,
                "seconds": time.perf_counter() - start, "eval_seconds": eval_seconds,
                "losses": losses, "resumes": resumes, "preemptions": preemptions}

    def checkpoint_before_preemption(epoch: int, notice: dict) -> None:
        """A just-in-time checkpoint (no validation: the node's deadline runs): the run
        resumes from this step on the workers left, or on new nodes."""
        left = (notice["deadline_ms"] / 1000 - time.time()) if notice["deadline_ms"] else None
        preemptions.append({"step": step, "nodes": notice["nodes"], "ranks": notice["ranks"],
                            "seconds_to_deadline": left})
        if show:
            when = f", {left:.0f} s before its deadline" if left is not None else ""
            show({"event": "preemption", "text": f"node(s) {', '.join(notice['nodes'])} "
                  f"(rank(s) {notice['ranks']}) are being preempted: checkpoint at step "
                  f"{step}{when}"})
        record = {"step": step, "epoch": epoch, "preemption": True, "workers": world,
                  "val_mrr": history[-1]["val_mrr"] if history else 0.0,
                  "seconds": time.perf_counter() - start}
        session.report(record, loop_state())

    try:
        last = None
        refresh_every = tc.entity_refresh_every if model.encodes_entities else None
        if model.encodes_entities:
            refresh_entity_cache(ctx, cfg.eval.batch_size, session)
        model.train()
        for epoch, _, micro_batches in batches:
            if step >= steps or (tc.max_minutes and session.agree_to_stop(
                    time.perf_counter() - start > 60 * tc.max_minutes)):
                break
            _maybe_inject_fault(cfg, rank, step + 1, out)
            fault_point("train.step")
            step_start = time.perf_counter()
            values = []
            for batch in micro_batches:  # the engine steps the optimizer after the last
                parts = compute_loss(model, ctx.collator, ctx.features, batch, known,
                                     num_negatives=tc.num_negatives,
                                     num_hard_negatives=tc.hard_negatives,
                                     knowledge_weight=tc.knowledge_weight,
                                     in_batch_negatives=tc.in_batch_negatives, generator=generator,
                                     group=session)
                engine.backward(parts.loss)
                engine.step()
                values.append(parts.value)
            step += 1
            if startup is not None and "first_step" not in startup:
                startup["first_step"] = time.time()
            if tc.step_delay_s:
                time.sleep(tc.step_delay_s)  # fault-test hook: a slower model
            if ledger is not None:
                ledger.write(f"{step}\n")
                ledger.flush()
            memory = memory or engine.memory_mb(model)
            if refresh_every and step % refresh_every == 0:
                refresh_entity_cache(ctx, cfg.eval.batch_size, session)
            losses.append(float(np.mean(values)))  # the global batch's, the same on every rank
            window.append(losses[-1])
            if show:
                show({"step": step, "steps": steps, "epoch": epoch, "loss": float(np.mean(window)),
                      "samples_per_s": samples_per_step * step / max(
                          time.perf_counter() - start - eval_seconds, 1e-9)})
            last = (epoch, parts)
            if step % eval_every == 0 or step == steps:
                validate(epoch, parts)  # a checkpoint too
                continue
            step_seconds.append(time.perf_counter() - step_start)
            notice = session.preempted()
            if notice is not None and notice["nodes"] != noticed and session.any_rank(
                    checkpoint_due(notice, float(np.mean(step_seconds)),
                                   session.checkpoint_seconds)):
                noticed = notice["nodes"]
                checkpoint_before_preemption(epoch, notice)
                hold_until_preempted(notice)
        if last is not None and (not history or history[-1]["step"] != step):
            validate(*last)  # stopped by train.max_minutes between validation rounds
        seconds = time.perf_counter() - start
        if startup is not None:
            startup["last_step"] = time.time()
    except BaseException:
        # Stopped (a Tune trial that ASHA stops gets SystemExit at its report) or failed:
        # the step ledger and the loggers are closed here, not left open in a process that
        # goes on (a reused Tune actor).
        if ledger is not None:
            ledger.close()
        with contextlib.suppress(Exception):  # the run's own error is the one to report
            logger.tracker.close()
        raise
    if ledger is not None:
        ledger.close()
    params = [p for p in model.parameters() if p.requires_grad]
    with gather(params) if gather else contextlib.nullcontext():
        if rank == 0:
            save_trainable(model, out / MODEL_SUBDIR)
    summary = {"steps": step, "train_seconds": seconds, "losses": losses, "history": history,
               "resumes": resumes, "preemptions": preemptions}
    if startup is not None:
        summary["startup"] = startup
    if rank == 0:
        write_json_atomic(out / "summary.json", summary)  # the driver reads it (Ray Train)
        logger.finish(history, steps=step, seconds=seconds)
    return summary


def train_local(cfg: Config, kg: KnowledgeGraph, spec: LoopSpec = LoopSpec(),
                ctx: ModelContext | None = None, *, show_progress: bool = True,
                report: Callable[[dict], None] | None = None,
                stage: str = "train") -> dict:
    """The local backend: the loop in this process with a :class:`TorchEngine`. Given
    ``ctx`` (e.g. a pruned model being fine-tuned in place) it trains that model and keeps
    its entity table. Writes ``<run_dir>/<spec.out_subdir>/{model/, summary.json, ...}``;
    ``report`` receives every validation record."""
    out = RunLayout.of(cfg).path(spec.out_subdir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = ctx or prepare_context(cfg, kg, spec)
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    queries = kg.queries("train", cfg.train.both_directions)
    steps = total_steps(cfg, optimizer_steps_per_epoch(cfg, queries))
    # A fixed thread count: the same config gives the same figures in any process.
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.train.threads_per_worker)
    progress = LoopProgress(stage, enabled=show_progress)
    try:
        summary = run_loop(cfg, kg, ctx, queries, TorchEngine(params, cfg, steps),
                           LocalSession(report), out, progress=progress)
    finally:
        torch.set_num_threads(threads)
        progress.close()
    return summary


def query_digest(queries: np.ndarray) -> dict:
    """The number and sha256 of ``(n, 3)`` training queries (as little-endian int64)."""
    data = np.ascontiguousarray(queries, dtype="<i8")
    return {"rows": int(len(data)), "sha256": hashlib.sha256(data.tobytes()).hexdigest()}


def check_queries(queries: np.ndarray, expected: dict, rank: int, cfg: Config) -> None:
    """Raise if this worker's training queries are not the driver's (``expected``: its
    :func:`query_digest`): a node whose copy of the dataset differs. Ray Train retries the
    error up to ``train.max_failures`` times (each restart fails the same way) and then
    reports it."""
    got = query_digest(queries)
    if got != expected:
        import socket

        raise RuntimeError(
            f"rank {rank} on {socket.gethostname()} read {got['rows']} training queries "
            f"(sha256 {got['sha256'][:12]}) from {RunLayout.of(cfg).dataset_dir}, the driver "
            f"read {expected['rows']} (sha256 {expected['sha256'][:12]}): every node must "
            "read the same dataset")


def train_loop_per_worker(config: dict) -> None:
    """The function a ``TorchTrainer`` runs on every worker: ``config`` holds the resolved
    config (``cfg``) and the :class:`LoopSpec` (``spec``) as plain dicts, the driver's
    :func:`query_digest` of the training queries (``queries_digest``) and rank 0's progress
    queue (``progress``, or None)."""
    marks = {"process": _process_start(), "entered": time.time()}
    cfg = config_from_dict(config["cfg"])
    spec = LoopSpec(**config["spec"])
    from elmm_ray.train import deepspeed as ds_setup

    if cfg.train.use_gpu:
        ds_setup.prepare_gpu_environment()
    else:
        ds_setup.prepare_cpu_environment()
    torch.set_num_threads(cfg.train.threads_per_worker)
    import deepspeed
    import ray.train

    ds_setup.disable_jit_ops()
    marks["imports"] = time.time()
    layout = RunLayout.of(cfg)
    layout.pull_inputs()  # a remote run directory: this node's mirror gets the inputs
    kg = load_dataset(cfg)
    marks["dataset"] = time.time()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    queries = kg.queries("train", cfg.train.both_directions)
    check_queries(queries, config["queries_digest"], rank, cfg)  # before building the model
    marks["queries"] = time.time()
    ctx = prepare_context(cfg, kg, spec)
    marks["model"] = time.time()
    steps = total_steps(cfg, optimizer_steps_per_epoch(cfg, queries))
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    client_optimizer = None
    if ds_setup.uses_client_optimizer(cfg, cfg.train.use_gpu):
        client_optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate,
                                             weight_decay=cfg.train.weight_decay)
    schedule = lr_lambda(cfg.train.warmup_steps, steps)
    checkpoint = ray.train.get_checkpoint()
    resumed = None
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as directory:
        if directory is not None:
            verify_checkpoint(directory)  # recorded digests, before anything is loaded
            state = load_weights(directory, ctx.model)  # ZeRO partitions them at initialize
        if cfg.deepspeed.zero_stage == 3:
            ds_setup.register_zero3_external_weights(ctx.model)
        engine, _, _, scheduler = deepspeed.initialize(
            model=ctx.model, model_parameters=params, optimizer=client_optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=ds_setup.deepspeed_config(cfg, use_gpu=cfg.train.use_gpu, world=world))
        if directory is not None:
            load_optimizer(directory, ctx.model, engine.optimizer, scheduler, state)
            resumed = resumed_state(directory, state, rank, cfg.train.seed)
    marks["engine"] = time.time()
    zero3 = cfg.deepspeed.zero_stage == 3

    def gather(params):
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero3)

    sink = config.get("progress")
    session = RaySession(engine, scheduler, ctx.model, resumed)
    run_loop(cfg, kg, ctx, queries, DeepSpeedEngine(engine, scheduler), session,
             layout.path(spec.out_subdir),
             progress=QueueProgress(sink) if sink is not None else None, gather=gather,
             after_best=lambda: layout.push(f"{spec.out_subdir}/{BEST_SUBDIR}"),
             startup=marks)
    if rank == 0:
        layout.push(spec.out_subdir)  # rank 0's outputs, for the driver on another node


def _process_start() -> float:
    """When this process started (epoch seconds): a Ray Train worker's actor process."""
    import psutil

    return psutil.Process().create_time()


class QueueProgress:
    """Rank 0's progress records into the driver's ``ray.util.queue.Queue``: at most one a
    second (validation rounds and the last step always), never blocking training."""

    def __init__(self, queue, interval_s: float = 1.0) -> None:
        # The first record always passes (perf_counter's origin is arbitrary: on a machine
        # booted minutes ago it is small, and a last time of 0 would throttle it).
        self.queue, self.interval_s, self.last = queue, interval_s, float("-inf")

    def __call__(self, record: dict) -> None:
        now = time.perf_counter()
        if ("event" not in record and "val_mrr" not in record and record["step"] < record["steps"]
                and now - self.last < self.interval_s):
            return
        self.last = now
        with contextlib.suppress(Exception):  # a full or gone queue must not stop training
            self.queue.put_nowait(record)

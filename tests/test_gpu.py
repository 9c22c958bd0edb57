"""CUDA-only checks of the real code paths (``pytest -m gpu``; skipped without CUDA): the tiny
ELMM in bf16, filtered ranking on the GPU, the fused optimizer DeepSpeed builds on GPU,
NCCL collectives of the training session, and a ``train`` stage on Ray Train with one GPU
worker (DeepSpeed ZeRO-2, bf16, NCCL). They use the tiny synthetic dataset, never
../shared."""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from elmm_ray.config import load_config
from elmm_ray.data.dataset import load_dataset
from elmm_ray.data.shards import pack_images
from elmm_ray.eval.evaluate import evaluate_model
from elmm_ray.eval.ranking import rank_with_vectors
from elmm_ray.layout import RunLayout, absolute_paths
from elmm_ray.stages import run_stage
from elmm_ray.train.context import build_context
from elmm_ray.train.loop import RaySession, init_entity_table, refresh_entity_cache
from elmm_ray.train.step import QueryBatches, compute_loss
from tests.tiny import TINY

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs CUDA (torch.cuda.is_available() is false)"),
]

CUDA = torch.device("cuda", 0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny run's data, shards and a fresh fp32 model on the CPU (entity table set)."""
    run_dir = tmp_path_factory.mktemp("gpu_tiny")
    cfg = absolute_paths(load_config("configs/demo.yaml", [f"run_dir={run_dir}", *TINY]))
    run_stage("synth", cfg, show_progress=False)
    kg = load_dataset(cfg)
    pack_images(kg, RunLayout.of(cfg).shard_dir, use_ray=False, show_progress=False)
    ctx = build_context(cfg, kg)
    init_entity_table(ctx, cfg.eval.batch_size)
    return cfg, kg, ctx


@pytest.fixture(autouse=True)
def _deepspeed_gpu_environment():
    """What a GPU training worker does before DeepSpeed builds its fused ops."""
    from elmm_ray.train import deepspeed as ds_setup

    ds_setup.prepare_gpu_environment()


@pytest.mark.slow
@pytest.mark.ray
def test_train_stage_on_ray_train_with_one_gpu_worker(tmp_path_factory):
    """First, before this process opens an NCCL group of its own. ``train`` (after synth,
    pack, extract, entity_init) on Ray Train: one GPU worker, DeepSpeed ZeRO-2 in bf16 on
    NCCL, the entity cache refreshed sharded (all_gather) every 2 steps and a time limit
    agreed every step (agree_to_stop): finite metrics."""
    import ray

    from elmm_ray.config import RayConfig
    from elmm_ray.ray_session import init_ray

    run_dir = tmp_path_factory.mktemp("gpu_ray")
    os.environ.setdefault("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray_gpu_tmp")))
    cfg = absolute_paths(load_config("configs/demo.yaml", [
        f"run_dir={run_dir}", *TINY, "train.backend=ray", "train.use_gpu=true",
        "train.num_workers=1", "train.cpus_per_worker=1", "deepspeed.zero_stage=2",
        "deepspeed.precision=bf16", "model.entity_repr=table+encoder",
        "train.entity_refresh_every=2", "train.max_minutes=30", "train.epochs=2",
        "train.val_max_queries=40", "ray.include_dashboard=false", "ray.num_cpus=8"]))
    started = not ray.is_initialized()
    init_ray(RayConfig(num_cpus=8, include_dashboard=False))
    try:
        assert ray.cluster_resources().get("GPU", 0) >= 1, ray.cluster_resources()
        payload = run_stage("train", cfg, show_progress=False).manifest
        # eval on a Ray GPU worker (eval.workers = train.num_workers), export on another
        exported = run_stage("export", cfg, show_progress=False).manifest
    finally:
        if started:
            ray.shutdown()
    history = _history(cfg)
    assert payload["steps"] > 2 and history, payload
    for record in history:
        for key in ("loss", "val_mrr", "lr"):
            assert np.isfinite(record[key]), (key, record)
    assert (RunLayout.of(cfg).trained_model / "trainable.json").is_file()
    metrics = json.loads(RunLayout.of(cfg).metrics_file(cfg.eval.split).read_text())
    assert np.isfinite(metrics["overall"]["mrr"]) and metrics["num_queries"] > 0
    assert (Path(exported["out_dir"]) / "elmm_export.json").is_file()


def _history(cfg) -> list[dict]:
    import json

    path = RunLayout.of(cfg).path("train", "metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def _batch(cfg, kg) -> torch.Tensor:
    queries = kg.queries("train", cfg.train.both_directions)
    return next(iter(QueryBatches(queries, cfg.train.global_batch_size, cfg.train.seed)))[2][0]


def _loss(model, ctx, cfg, kg, batch):
    """The training loss of ``batch`` (eval mode: no dropout; the same sampled negatives)."""
    return compute_loss(model, ctx.collator, ctx.features, batch, kg.filter_index(("train",)),
                        num_negatives=cfg.train.num_negatives,
                        knowledge_weight=0.5, in_batch_negatives=cfg.train.in_batch_negatives,
                        generator=torch.Generator().manual_seed(0))


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.float().flatten().cpu() for p in model.parameters()
                      if p.requires_grad and p.grad is not None])


def test_bf16_forward_backward_is_finite_and_close_to_fp32(tiny):
    cfg, kg, ctx = tiny
    batch = _batch(cfg, kg)
    fp32 = copy.deepcopy(ctx.model).to(CUDA).eval()
    bf16 = copy.deepcopy(ctx.model).to(CUDA).bfloat16().eval()  # as DeepSpeed's bf16 does
    cpu = _loss(ctx.model.eval(), ctx, cfg, kg, batch)
    ref = _loss(fp32, ctx, cfg, kg, batch)
    low = _loss(bf16, ctx, cfg, kg, batch)
    # fp32 on CUDA vs CPU: the same arithmetic up to summation order.
    assert ref.loss.item() == pytest.approx(cpu.loss.item(), rel=1e-4, abs=1e-5)
    assert torch.isfinite(low.loss)
    # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%) through 2 LLM layers + MVTC:
    # the loss (about log of the candidate count) agrees within 3%.
    assert low.loss.item() == pytest.approx(ref.loss.item(), rel=0.03)
    ref.loss.backward()
    low.loss.backward()
    g32, g16 = _grads(fp32), _grads(bf16)
    assert torch.isfinite(g16).all() and g16.abs().sum() > 0
    cosine = torch.nn.functional.cosine_similarity(g32, g16, dim=0).item()
    assert cosine > 0.95, f"bf16 gradient direction differs from fp32 (cosine {cosine:.3f})"


def test_gpu_ranking_equals_cpu_ranking(tiny):
    """The ranking kernel itself on CUDA: in float64 the scores agree to ~1e-15, so every
    filtered rank and top-1 must be identical."""
    _, kg, _ = tiny
    queries = kg.queries("test")
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(len(queries), 16, generator=generator, dtype=torch.float64)
    table = torch.randn(kg.num_entities, 16, generator=generator, dtype=torch.float64)
    table[1] = table[0]  # an exact tie: counted at its mean on both devices
    index = kg.filter_index()
    on_cpu = rank_with_vectors(vectors, table, queries, index, batch_size=7, cosine=True,
                               temperature=0.05)
    on_gpu = rank_with_vectors(vectors.to(CUDA), table.to(CUDA), queries, index, batch_size=7,
                               cosine=True, temperature=0.05)
    np.testing.assert_array_equal(on_gpu.ranks, on_cpu.ranks)
    np.testing.assert_array_equal(on_gpu.top1, on_cpu.top1)


def test_evaluation_of_the_model_on_cuda_equals_cpu(tiny):
    """``evaluate_model`` with the model on CUDA (fp32): query vectors differ from the CPU's
    by summation order (~1e-6), which can move a target only past a near-tie; allow one
    query's worth of change in each metric."""
    cfg, kg, ctx = tiny
    kwargs = dict(split="test", batch_size=cfg.eval.batch_size, ks=(1, 3, 10))
    on_cpu = evaluate_model(ctx.model, ctx.collator, ctx.features, kg, **kwargs)
    on_gpu = evaluate_model(copy.deepcopy(ctx.model).to(CUDA), ctx.collator, ctx.features,
                            kg, **kwargs)
    one_query = 1.0 / on_cpu["num_queries"]
    assert on_gpu["num_queries"] == on_cpu["num_queries"]
    for key in ("mrr", "hits@1", "hits@3", "hits@10"):
        assert abs(on_gpu["overall"][key] - on_cpu["overall"][key]) <= one_query + 1e-9, key


def _adam_step(optimizer_cls, params: list[torch.Tensor], grads: list[torch.Tensor], **kw):
    params = [p.detach().clone().requires_grad_(True) for p in params]
    optimizer = optimizer_cls(params, lr=1e-2, weight_decay=0.01, **kw)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    optimizer.step()
    return [p.detach() for p in params]


def test_fused_optimizers_match_the_unfused_step(tiny):
    """DeepSpeed's FusedAdam (what ``deepspeed_config(use_gpu=True)`` asks for: JIT-built
    with nvcc) and torch's fused AdamW take the same step as torch's plain AdamW."""
    from deepspeed.ops.adam import FusedAdam

    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=generator).to(CUDA) for shape in ((64, 32), (7,))]
    grads = [torch.randn(p.shape, generator=generator).to(CUDA) for p in params]
    plain = _adam_step(torch.optim.AdamW, params, grads, foreach=False)
    fused_torch = _adam_step(torch.optim.AdamW, params, grads, fused=True)
    fused_ds = _adam_step(FusedAdam, params, grads, adam_w_mode=True)
    for a, b, c in zip(plain, fused_torch, fused_ds):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def nccl_group():
    """A one-process NCCL group in this process (what Ray Train sets up on a GPU worker)."""
    import torch.distributed as dist

    torch.cuda.set_device(0)
    port = _free_port()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1, device_id=CUDA)
    yield dist
    dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_session_collectives_and_sharded_cache_refresh_on_nccl(tiny, nccl_group):
    """RaySession.all_gather / agree_to_stop (written for NCCL: CUDA tensors only) and the
    sharded entity-cache refresh, on a real NCCL group of one rank."""
    cfg, kg, ctx = tiny
    assert nccl_group.get_backend() == "nccl"
    session = SimpleNamespace(rank=0, world=1, device=CUDA)  # the state RaySession keeps
    session.any_rank = lambda flag: RaySession.any_rank(session, flag)
    cpu_tensor = torch.arange(6.0).reshape(3, 2)
    gathered = RaySession.all_gather(session, cpu_tensor)
    assert gathered.device == cpu_tensor.device
    torch.testing.assert_close(gathered, cpu_tensor)
    assert RaySession.agree_to_stop(session, True) is True
    assert RaySession.agree_to_stop(session, False) is False
    assert RaySession.any_rank(session, True) is True  # the new-best agreement of save_best

    model = copy.deepcopy(ctx.model).to(CUDA)
    model.entity_repr = "table+encoder"  # entity vectors read the cache
    session.all_gather = lambda t: RaySession.all_gather(session, t)
    encoded_ctx = SimpleNamespace(model=model, collator=ctx.collator, features=ctx.features)
    refresh_entity_cache(encoded_ctx, cfg.eval.batch_size, session)
    assert model.entity_cache.device.type == "cuda"
    assert model.entity_cache.norm(dim=-1).sub(1).abs().max() < 1e-4  # every row filled


def test_deepspeed_engine_on_gpu_uses_fused_adam_and_learns(tiny, nccl_group):
    """The engine ``train_loop_per_worker`` builds on GPU (ZeRO-2, bf16, DeepSpeed's
    optimizer from the config): its optimizer is FusedAdam and a few steps lower the loss."""
    import deepspeed
    from deepspeed.ops.adam import FusedAdam

    from elmm_ray.train import deepspeed as ds_setup

    cfg, kg, ctx = tiny
    model = copy.deepcopy(ctx.model)
    params = [p for p in model.parameters() if p.requires_grad]
    config = ds_setup.deepspeed_config(cfg, use_gpu=True)
    assert config["bf16"] == {"enabled": True} and config["optimizer"]["type"] == "AdamW"
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=params,
                                                   config=config)
    inner = getattr(optimizer, "optimizer", optimizer)
    assert isinstance(inner, FusedAdam), type(inner)
    assert next(model.parameters()).dtype == torch.bfloat16
    batch = _batch(cfg, kg)
    losses = []
    for _ in range(8):
        parts = _loss(model, ctx, cfg, kg, batch)
        engine.backward(parts.loss)
        engine.step()
        losses.append(parts.loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses

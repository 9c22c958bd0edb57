"""The plan against measurement on this CPU: the tiny config's planned training tensors
(activations, weights, gradients, optimizer states) and step time next to the measured ones.

    PYTHONPATH=. python bench/bench_plan.py      # -> bench/results/plan.json + a table

Measured: one query-encoding training micro-step of the real tiny ELMM (fp32, one process,
no DeepSpeed): the bytes of every tensor autograd saves (the same counter the plan runs on
meta tensors), the parameters, gradients and AdamW states as allocated, and the wall time of
forward + backward + optimizer step (median of 5 after a warm-up). The planned step time is
the plan's FLOPs per step over this CPU's measured fp32 GEMM rate (1024^3 matmuls) at
MFU 1; the ratio is the MFU the tiny model reaches here. Peak RSS is not compared: Python's
and the libraries' own memory dwarfs a tiny model's tensors."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import save  # noqa: E402
from elmm_ray.config import load_config  # noqa: E402
from elmm_ray.data.kg import load_kg  # noqa: E402
from elmm_ray.data.synth import synth_from_config  # noqa: E402
from elmm_ray.models.build import build_elmm, build_tokenizer  # noqa: E402
from elmm_ray.models.lora import apply_lora  # noqa: E402
from elmm_ray.plan.meta import saved_bytes  # noqa: E402
from elmm_ray.plan.report import make_plan  # noqa: E402
from elmm_ray.tables import format_table  # noqa: E402
from elmm_ray.train.context import entity_texts  # noqa: E402

GIB = 1024**3


def gemm_flops(n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="bench_plan."))
    overrides = ["model.preset=tiny", "train.num_workers=1", "train.global_batch_size=16",
                 "mvtc.n_visual=8", "mvtc.n_text=8", "mvtc.heads=4", "model.max_text_tokens=32",
                 "images.max_images_per_entity=4", "train.backend=local",
                 f"run_dir={work / 'run'}", f"dataset.path={work / 'data'}"]
    cfg = load_config(None, overrides)
    synth_from_config(cfg.dataset.synth, work / "data")
    plan = make_plan(cfg)
    kg = load_kg(work / "data")
    tokenizer = build_tokenizer(cfg, entity_texts(kg) + list(kg.relation_texts))
    model = build_elmm(cfg, num_entities=kg.num_entities, tokenizer=tokenizer)
    apply_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
               target_regex=cfg.lora.target_regex)
    model.train()
    micro, length = plan["micro_batch"], plan["prompt_tokens"]
    hidden = model.backbone.config.text_config.hidden_size
    vision = model.backbone.config.vision_config.hidden_size
    grid = cfg.model.image_size // cfg.model.patch_size
    patches = cfg.images.max_images_per_entity * grid**2
    params = [p for p in model.parameters()]
    trained = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4)

    def step() -> torch.Tensor:
        feats = torch.randn(micro, patches, vision)
        text = torch.randn(micro, cfg.model.max_text_tokens, hidden)
        ones = torch.ones(micro, patches, dtype=torch.bool)
        text_mask = torch.ones(micro, text.shape[1], dtype=torch.bool)
        visual, _ = model.mvtc(feats, ones, text, text_mask)
        visual = model.projector(visual)
        embeds = torch.cat([torch.randn(micro, length - visual.shape[1], hidden), visual], 1)
        out = model.language_model(inputs_embeds=embeds).last_hidden_state
        return model.readout(out[:, -1]).square().mean()

    measured_acts = saved_bytes(step, params)  # real tensors, the plan's own counter
    times = []
    for i in range(6):
        start = time.perf_counter()
        optimizer.zero_grad()
        step().backward()
        optimizer.step()
        if i:
            times.append(time.perf_counter() - start)
    measured_step = statistics.median(times)
    states = sum(s.numel() * s.element_size() for st in optimizer.state.values()
                 for s in st.values() if torch.is_tensor(s) and s.dim())
    n_trained = sum(p.numel() for p in trained)
    measured = {
        "activations_bytes": measured_acts,
        "weights_bytes": sum(p.numel() * p.element_size() for p in params),
        "gradients_bytes": sum(p.numel() * p.element_size() for p in trained),
        # AdamW states exist only for parameters this step reaches (not the entity table)
        "optimizer_bytes": states,
        "step_seconds": measured_step,
    }
    row = next(r for r in plan["stages"] if r["stage"] == "train ZeRO-2")
    parts = row["memory_parts_gib"]
    acts = plan["activations_gib"]
    planned = {
        "activations_bytes": (acts["llm"] + acts["mvtc"]) * GIB,
        "weights_bytes": (parts["weights (frozen)"] + parts["weights (trained)"]) * GIB,
        "gradients_bytes": parts["gradients"] * GIB,
        "optimizer_bytes": parts["optimizer states"] * GIB,
    }
    peak = gemm_flops()
    planned["step_seconds"] = plan["train_flops_per_step"] / peak
    ratios = {k: planned[k] / measured[k] for k in planned if measured[k]}
    rows = [(k, f"{planned[k]:,.4g}", f"{measured[k]:,.4g}", f"{ratios[k]:.3f}") for k in planned]
    print(format_table(rows, ["figure", "planned", "measured", "planned / measured"],
                       title=f"tiny config, micro-batch {micro} x {length} tokens, fp32, 1 thread"))
    print(f"fp32 GEMM rate here: {peak / 1e9:.1f} GFLOP/s; the step reaches "
          f"{ratios['step_seconds']:.3f} of it (the planned time is at MFU 1)")
    save("plan", {
        "command": "PYTHONPATH=. python bench/bench_plan.py", "overrides": overrides,
        "estimated_vs_measured": "planned = `elmm-ray plan` figures (activations counted on "
        "meta tensors with flash-style attention; model states by DeepSpeed's accounting, "
        "here fp32 without master copies); measured = the real tiny model's tensors on this "
        "CPU (torch SDPA, one process, AdamW)",
        "micro_batch": micro, "prompt_tokens": length, "trainable_params": n_trained,
        "train_flops_per_step": plan["train_flops_per_step"], "gemm_flops_per_s": peak,
        "planned": planned, "measured": measured, "ratios": ratios,
        "implied_mfu": ratios["step_seconds"]})


if __name__ == "__main__":
    main()

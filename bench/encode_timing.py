"""Query-encoding timing shared by the compression and pruning benchmarks.

- :func:`build_models`: an MVTC model and an uncompressed one sharing one random backbone at
  a named shape (``small``: the old LLM 512x4; ``mid``: LLM 1024x8, where the LLM dominates).
- :class:`PhaseTimer`: per-phase CPU time of the model's own functions (forward hooks on
  its MVTC, projector, embeddings, LLM and readout; a wrapper on ``build_prompt``), so the
  profile never re-implements model code.
- :func:`count_flops`: FLOPs of one pass (``torch.utils.flop_counter``, with CPU flash
  attention counted too), per phase.
- :func:`interleaved`: repeats in which the models take turns, wall and CPU time each.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.utils import flop_counter

from elmm_ray.config import build_config
from elmm_ray.data.collate import QueryCollator
from elmm_ray.models.build import build_elmm, build_tokenizer
from elmm_ray.models.elmm import ELMM

# name -> LLM width, layers, heads, kv heads, MLP width; vision width; tokens per image
# (image side 16 * sqrt(tokens)); CPU batch (and fewer repeats) per token count: the training
# batch, 32, does not fit the 15-minute CPU budget uncompressed (10 x 576 tokens is ~2.6
# TFLOP per query, ~25 s of one core).
SHAPES: dict[str, dict] = {
    "small": {"llm_hidden": 512, "llm_layers": 4, "llm_heads": 8, "llm_kv_heads": 8,
              "llm_intermediate": 2048, "vision_hidden": 256, "tokens": (144,),
              "batch": {144: 4}},
    "mid": {"llm_hidden": 1024, "llm_layers": 8, "llm_heads": 16, "llm_kv_heads": 8,
            "llm_intermediate": 4096, "vision_hidden": 256, "tokens": (144, 576),
            "batch": {144: 4, 576: 1}, "repeats": {576: 2}},
    "quick": {"llm_hidden": 128, "llm_layers": 2, "llm_heads": 8, "llm_kv_heads": 8,
              "llm_intermediate": 512, "vision_hidden": 64, "tokens": (16,),
              "batch": {16: 2}},
}
PHASES = ("mvtc", "projector", "embedding", "packing", "llm", "readout", "other")
NUM_ENTITIES = 1000
# the LLM projections structured pruning shrinks (KV groups: q/k/v/o; neurons: gate/up/down)
PROJECTIONS = (".q_proj", ".k_proj", ".v_proj", ".o_proj", ".gate_proj", ".up_proj",
               ".down_proj")


def shape_overrides(shape: dict, tokens: int, n_visual: int = 32, n_text: int = 32) -> list[str]:
    """Config overrides of a tiny backbone at ``shape`` with ``tokens`` patch tokens/image."""
    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise ValueError(f"tokens per image must be a square number, got {tokens}")
    return [f"model.llm_hidden={shape['llm_hidden']}", f"model.llm_layers={shape['llm_layers']}",
            f"model.llm_intermediate={shape['llm_intermediate']}",
            f"model.llm_heads={shape['llm_heads']}", f"model.llm_kv_heads={shape['llm_kv_heads']}",
            f"model.image_size={16 * side}", "model.patch_size=16",
            f"model.vision_hidden={shape['vision_hidden']}", "model.vision_heads=8",
            "model.vision_layers=1", f"mvtc.n_visual={n_visual}", f"mvtc.n_text={n_text}",
            "mvtc.heads=8"]


def build_models(shape: dict, tokens: int, images: int, batch_size: int, *,
                 uncompressed: bool = True, seed: int = 0
                 ) -> tuple[dict[str, ELMM], dict[str, torch.Tensor]]:
    """``{"mvtc": ..., "uncompressed": ...}`` (one backbone, eval mode) and a query batch of
    ``batch_size`` queries with ``images`` images of ``tokens`` random patch features each."""
    torch.manual_seed(seed)
    overrides = shape_overrides(shape, tokens)
    names = [f"entity {i} with a name of some words" for i in range(NUM_ENTITIES)]
    relations = ["relation one", "relation two"]
    cfg = build_config(overrides=overrides)
    tokenizer = build_tokenizer(cfg, names + relations)
    models = {"mvtc": build_elmm(cfg, num_entities=NUM_ENTITIES, tokenizer=tokenizer).eval()}
    if uncompressed:
        full = build_elmm(build_config(overrides=[*overrides, "model.uncompressed=true"]),
                          num_entities=NUM_ENTITIES, tokenizer=tokenizer).eval()
        full.backbone = models["mvtc"].backbone  # identical backbone weights
        models["uncompressed"] = full
    collator = QueryCollator(tokenizer, names, relations, 2, 32)
    width = shape["vision_hidden"]
    batch = collator(torch.arange(batch_size), torch.zeros(batch_size, dtype=torch.long),
                     torch.randn(batch_size, images, tokens, width),
                     torch.ones(batch_size, images, dtype=torch.bool))
    return models, batch


def prompt_tokens(model: ELMM, batch: dict[str, torch.Tensor]) -> float:
    """Mean LLM prompt length of ``batch`` (after packing)."""
    with torch.no_grad():
        return float(model.build_prompt(batch)[1].sum(1).float().mean())


def query_pass(model: ELMM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Query encoding, the timed unit (scoring is timed apart: evaluation scores against a
    table computed once, ``ELMM.score`` recomputes the entity vectors on every call)."""
    return model.encode_queries(batch)


def cpu_clock() -> float:
    """CPU seconds of the computation: this thread's when torch runs single-threaded (time
    waiting for a core on a loaded machine does not count), else the whole process's."""
    return time.thread_time() if torch.get_num_threads() == 1 else time.process_time()


class PhaseTimer:
    """CPU seconds (:func:`cpu_clock`) per phase of :func:`query_pass`, from hooks on the
    model's own modules.

    ``packing`` is ``build_prompt`` minus the MVTC/projector/embedding work inside it
    (concatenation, masks, the stable sort and gather that pack padding away); ``other``
    is the rest of the pass (picking the readout rows, normalisation, calls)."""

    MODULES = {"mvtc": "mvtc", "projector": "projector", "embedding": "input_embeddings",
               "learned": "learned_tokens", "visual_input": "visual_input",
               "llm": "language_model", "readout": "readout"}

    def __init__(self, model: ELMM) -> None:
        self.model = model
        self.seconds: dict[str, float] = defaultdict(float)
        self._handles: list = []
        self._starts: dict[str, list[float]] = defaultdict(list)

    def _pre(self, name: str) -> Callable:
        def hook(*_args) -> None:
            self._starts[name].append(cpu_clock())
        return hook

    def _post(self, name: str) -> Callable:
        def hook(*_args) -> None:
            self.seconds[name] += cpu_clock() - self._starts[name].pop()
        return hook

    def _wrap(self, name: str, fn: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            start = cpu_clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += cpu_clock() - start
        return wrapped

    def __enter__(self) -> PhaseTimer:
        for phase, attribute in self.MODULES.items():
            module = getattr(self.model, attribute, None)
            if module is None:
                continue
            self._handles.append(module.register_forward_pre_hook(self._pre(phase)))
            self._handles.append(module.register_forward_hook(self._post(phase)))
        # instance attributes shadow the methods for this pass only
        self.model.build_prompt = self._wrap("build_prompt", type(self.model).build_prompt
                                             .__get__(self.model))
        return self

    def __exit__(self, *_exc) -> None:
        for handle in self._handles:
            handle.remove()
        del self.model.build_prompt

    def phases(self, total: float) -> dict[str, float]:
        """Seconds per entry of :data:`PHASES` for a pass of ``total`` CPU seconds."""
        s = self.seconds
        embedding = s["embedding"] + s["learned"]
        inside_prompt = s["mvtc"] + s["projector"] + embedding + s["visual_input"]
        out = {"mvtc": s["mvtc"], "projector": s["projector"], "embedding": embedding,
               "packing": s["build_prompt"] - inside_prompt, "llm": s["llm"],
               "readout": s["readout"]}
        out["other"] = total - sum(out.values())
        return out


def _register_cpu_attention_flops() -> None:
    """Count CPU flash attention like the CUDA kernels (full ``L x L`` scores and mixing)."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op in flop_counter.flop_registry:
        return

    def formula(query_shape, key_shape, value_shape, *_args, out_shape=None, **_kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    flop_counter.register_flop_formula(op)(formula)


def count_flops(model: ELMM, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """FLOPs of one :func:`query_pass` (matmuls and attention; elementwise work is not
    counted), in total and for the MVTC, projector and LLM submodules (``rest``: the
    readout); ``prunable``: the LLM projections of :data:`PROJECTIONS` (inside ``llm``)."""
    _register_cpu_attention_flops()
    counter = flop_counter.FlopCounterMode(display=False)
    # its module tracker cannot follow tensors that require grad but have no graph
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.no_grad(), counter:
            query_pass(model, batch)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    per_module = counter.get_flop_counts()
    total = float(counter.get_total_flops())

    def of(attribute: str, module: torch.nn.Module | None) -> float:
        # the tracker names a module by its path under the outermost module called
        # (``ELMM.backbone.model.language_model``) or, called directly, by its class
        if module is None:
            return 0.0
        hits = [name for name in per_module
                if name == type(module).__name__ or name.endswith("." + attribute)]
        return float(sum(per_module[min(hits, key=len)].values())) if hits else 0.0

    out = {"total": total, "mvtc": of("mvtc", model.mvtc),
           "projector": of("multi_modal_projector", model.projector),
           "llm": of("language_model", model.language_model)}
    out["rest"] = total - out["mvtc"] - out["projector"] - out["llm"]
    out["prunable"] = float(sum(sum(ops.values()) for name, ops in per_module.items()
                                if name.endswith(PROJECTIONS)))
    return out


@contextmanager
def _maybe(timer: PhaseTimer | None) -> Iterator[None]:
    if timer is None:
        yield
    else:
        with timer:
            yield


def interleaved(models: dict[str, ELMM], batch: dict[str, torch.Tensor], repeats: int,
                profile: bool = True, log: Callable[[str], None] | None = None
                ) -> dict[str, dict]:
    """Time :func:`query_pass` of each model, the models taking turns in every repeat.

    Per model: wall and CPU seconds of every repeat, their median and min, (with
    ``profile``) the per-phase CPU seconds of every repeat, and ``scoring``: wall seconds
    of ``ELMM.score`` on the encoded queries (not part of the encoding time)."""
    out = {name: {"wall": [], "cpu": [], "phases": [], "scoring": []} for name in models}
    with torch.no_grad():
        for step in range(repeats):
            for name, model in models.items():
                timer = PhaseTimer(model) if profile else None
                with _maybe(timer):
                    wall, cpu = time.perf_counter(), cpu_clock()
                    vectors = query_pass(model, batch)
                    wall, cpu = time.perf_counter() - wall, cpu_clock() - cpu
                start = time.perf_counter()
                model.score(vectors)
                out[name]["scoring"].append(time.perf_counter() - start)
                out[name]["wall"].append(wall)
                out[name]["cpu"].append(cpu)
                if timer is not None:
                    out[name]["phases"].append(timer.phases(cpu))
                if log:
                    log(f"  repeat {step + 1}/{repeats} {name}: {wall:.3f}s wall, "
                        f"{cpu:.3f}s cpu, load {os.getloadavg()[0]:.2f}")
    for record in out.values():
        record["scoring_median"] = statistics.median(record["scoring"])
        for clock in ("wall", "cpu"):
            record[f"{clock}_median"] = statistics.median(record[clock])
            record[f"{clock}_min"] = min(record[clock])
        if record["phases"]:
            record["phase_median"] = {p: statistics.median(r[p] for r in record["phases"])
                                      for p in PHASES}
    return out

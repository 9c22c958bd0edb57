"""GPU figures (CUDA, bf16): query encoding MVTC vs uncompressed at a mid shape, extraction
images/s of a CLIP ViT-L/14-336-sized tower, and evaluation throughput at the FB15k-237
test-set shape. Prints tables and writes ``bench/results/gpu.json``.

(a) LLM 1024 wide x 8 layers, 10 images x 576 patch tokens (width 1024) per query, batch 32
    (the demo config's training batch): MVTC (32 + 32 tokens) vs every projected patch
    token in the prompt; medians of interleaved repeats in one process; the analytic FLOP
    ratio of the same shape (``bench_compression``'s formulas).
(b) A random-init CLIP vision tower of ViT-L/14-336 size (24 layers, 1024 wide, 16 heads,
    336 px, patch 14) built from a config like the project's towers, in bf16: the extract
    actor's call (``_TowerActor``: CPU pixels in, fp16 features as an Arrow block out) and
    the tower forward alone (``encode_images`` on GPU-resident pixels), per batch size.
(c) Evaluation of the tiny model (`preset: tiny`) on a random KG of FB15k-237's size
    (14,541 entities, 237 relations, 272,115 train triples): ``evaluate_model`` on 4,000
    test queries (2,000 triples x 2 directions) with the model on CUDA, and the ranking
    step alone on CPU vs GPU.

    python bench/bench_gpu.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compression import mvtc_flops, prefill_flops  # noqa: E402
from common import REPO_ROOT, save  # noqa: E402

sys.path.insert(0, str(REPO_ROOT))

from elmm_ray.config import build_config  # noqa: E402
from elmm_ray.data.collate import QueryCollator  # noqa: E402
from elmm_ray.data.image_features import FeatureBank  # noqa: E402
from elmm_ray.data.kg import KnowledgeGraph  # noqa: E402
from elmm_ray.eval.evaluate import encode_queries, evaluate_model, select_queries  # noqa: E402
from elmm_ray.eval.ranking import rank_with_vectors  # noqa: E402
from elmm_ray.models.backbone import (  # noqa: E402
    build_tiny_llava,
    encode_images,
    image_feature_shape,
    vision_tower_of,
)
from elmm_ray.models.build import build_elmm, build_tokenizer  # noqa: E402
from elmm_ray.tables import format_table  # noqa: E402

CUDA = torch.device("cuda")


def timed(fn, repeats: int) -> list[float]:
    """Seconds of each call of ``fn`` (CUDA synchronised around it)."""
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return out


def compression(args: argparse.Namespace) -> dict:
    hidden, layers, images = args.llm_hidden, args.llm_layers, 10
    common = [f"model.llm_hidden={hidden}", f"model.llm_layers={layers}",
              f"model.llm_intermediate={4 * hidden}", "model.llm_heads=16",
              "model.llm_kv_heads=16", f"model.image_size={args.image_size}",
              "model.patch_size=14", "model.vision_hidden=1024", "model.vision_layers=1",
              "model.vision_heads=16", "mvtc.n_visual=32", "mvtc.n_text=32", "mvtc.heads=8",
              "model.dtype=bfloat16"]
    names = [f"entity {i} with a name of some words" for i in range(64)]
    relations = ["relation one", "relation two"]
    cfg = build_config(overrides=common)
    tokenizer = build_tokenizer(cfg, names + relations)
    torch.manual_seed(0)
    mvtc_model = build_elmm(cfg, num_entities=64, tokenizer=tokenizer).eval().to(CUDA)
    full_model = build_elmm(build_config(overrides=[*common, "model.uncompressed=true"]),
                            num_entities=64, tokenizer=tokenizer).eval().to(CUDA)
    full_model.backbone = mvtc_model.backbone  # identical backbone weights
    collator = QueryCollator(tokenizer, names, relations, 2, 32)
    tokens, width = image_feature_shape(mvtc_model.backbone)
    batch = collator(torch.arange(args.batch), torch.zeros(args.batch, dtype=torch.long),
                     torch.randn(args.batch, images, tokens, width),
                     torch.ones(args.batch, images, dtype=torch.bool))
    batch = {k: v.to(CUDA) for k, v in batch.items()}  # timed: the model, not the copy
    models = {"mvtc": mvtc_model, "uncompressed": full_model}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            timed(lambda m=model: m.encode_queries(batch), 2)  # warm-up
        for _ in range(args.repeats):
            for name, model in models.items():
                times[name] += timed(lambda m=model: m.encode_queries(batch), 1)
        prompt = {name: float(model.build_prompt(batch)[1].sum(1).float().mean())
                  for name, model in models.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    llm = mvtc_model.language_model
    params = sum(p.numel() for p in llm.parameters()) - llm.embed_tokens.weight.numel()
    projector = sum(p.numel() for p in mvtc_model.projector.parameters())
    full = (prefill_flops(params, layers, hidden, prompt["uncompressed"])
            + 2 * images * tokens * projector)
    compressed = (prefill_flops(params, layers, hidden, prompt["mvtc"])
                  + mvtc_flops(64, images * tokens, width) + 2 * 64 * projector)
    result = {"llm_hidden": hidden, "llm_layers": layers, "images": images,
              "tokens_per_image": tokens, "batch": args.batch, "repeats": args.repeats,
              "prompt_tokens": prompt, "median_ms": {k: v * 1e3 for k, v in median.items()},
              "ms_per_query": {k: v * 1e3 / args.batch for k, v in median.items()},
              "measured_speedup": median["uncompressed"] / median["mvtc"],
              "flop_ratio": full / compressed,
              "gflops_per_query": {"uncompressed": full / 1e9, "mvtc": compressed / 1e9}}
    rows = [(k, f"{prompt[k]:.0f}", f"{median[k] * 1e3:.1f}",
             f"{median[k] * 1e3 / args.batch:.2f}") for k in ("uncompressed", "mvtc")]
    print(format_table(rows, ["prompt", "tokens/query", "ms/batch", "ms/query"],
                       title=f"(a) query encoding, bf16 CUDA: LLM {hidden}x{layers}, {images} "
                             f"images x {tokens} tokens, batch {args.batch}"))
    print(f"speedup {result['measured_speedup']:.1f}x, FLOP ratio {result['flop_ratio']:.1f}x")
    return result


def extraction(args: argparse.Namespace) -> dict:
    from elmm_ray.data.extraction import _TowerActor

    size, patch, width = 336, 14, 1024
    tokens = (size // patch) ** 2
    llava = build_tiny_llava(vision_hidden=width, vision_layers=24, vision_heads=16,
                             image_size=size, patch_size=patch, llm_hidden=64, llm_layers=1,
                             llm_heads=4, llm_kv_heads=4, llm_intermediate=128,
                             vocab_size=300, image_token_id=299, pad_token_id=0)
    tower_params = sum(p.numel() for p in vision_tower_of(llava).parameters())
    rows, out = [], {"tower_params_m": tower_params / 1e6, "image_size": size,
                     "patch_size": patch, "layers": 24, "width": width, "by_batch": {}}
    with tempfile.TemporaryDirectory() as source:
        llava.save_pretrained(source)
        del llava
        actor = _TowerActor(source, "bfloat16", -2, 1, tokens, width, True, 0)
    assert actor.device.type == "cuda", actor.device
    for batch_size in args.extract_batches:
        pixels = np.random.default_rng(0).standard_normal(
            (batch_size, 3, size, size), dtype=np.float32)
        block = {"entity": np.arange(batch_size), "entity_id": [str(i) for i in
                                                                 range(batch_size)],
                 "image_index": np.zeros(batch_size), "error": [""] * batch_size,
                 "pixels": pixels}
        on_gpu = torch.from_numpy(pixels).to(CUDA, torch.bfloat16)
        with torch.no_grad():
            timed(lambda b=block: actor(b), 1)
            call = statistics.median(timed(lambda b=block: actor(b), args.extract_repeats))
            forward = statistics.median(timed(
                lambda x=on_gpu: encode_images(actor.tower, x, layer=-2), args.extract_repeats))
        out["by_batch"][batch_size] = {"actor_images_per_s": batch_size / call,
                                       "tower_images_per_s": batch_size / forward}
        rows.append((batch_size, f"{batch_size / call:.0f}", f"{batch_size / forward:.0f}"))
        del on_gpu
    print(format_table(rows, ["batch", "extract actor img/s", "tower forward img/s"],
                       title=f"(b) ViT-L/14-336-sized tower ({tower_params / 1e6:.0f}M "
                             f"params, {tokens} tokens/image), bf16 CUDA"))
    return out


def fb15k_shaped_kg(seed: int = 0) -> KnowledgeGraph:
    """Random triples with FB15k-237's counts (entities, relations, splits)."""
    rng = np.random.default_rng(seed)
    entities, relations = 14_541, 237
    total = 272_115 + 17_535 + 20_466
    triples = np.stack([rng.integers(0, entities, total), rng.integers(0, relations, total),
                        rng.integers(0, entities, total)], axis=1).astype(np.int64)
    triples = np.unique(triples, axis=0)[rng.permutation(len(np.unique(triples, axis=0)))]
    splits = {"train": triples[:272_115], "valid": triples[272_115:272_115 + 17_535],
              "test": triples[272_115 + 17_535:]}
    names = [f"entity {i}" for i in range(entities)]
    return KnowledgeGraph(
        name="fb15k237-shaped", entities=[f"/m/{i}" for i in range(entities)],
        relations=[f"/r/{r}" for r in range(relations)], entity_names=names,
        entity_descriptions=[""] * entities,
        relation_texts=[f"relation {r}" for r in range(relations)], triples=splits,
        entity_images=[[] for _ in range(entities)], has_text=np.ones(entities, dtype=bool))


def evaluation(args: argparse.Namespace) -> dict:
    kg = fb15k_shaped_kg()
    cfg = build_config(overrides=["model.preset=tiny", "model.dtype=bfloat16", "mvtc.n_visual=8",
                                  "mvtc.n_text=8", "mvtc.heads=4"])
    tokenizer = build_tokenizer(cfg, kg.entity_names + kg.relation_texts)
    torch.manual_seed(0)
    model = build_elmm(cfg, num_entities=kg.num_entities, tokenizer=tokenizer).eval().to(CUDA)
    tokens, width = image_feature_shape(model.backbone)
    generator = torch.Generator().manual_seed(0)
    features = FeatureBank(torch.randn(kg.num_entities, 1, tokens, width,
                                       generator=generator).half(),
                           torch.ones(kg.num_entities, 1, dtype=torch.bool))
    texts = [kg.entity_text(i) for i in range(kg.num_entities)]
    collator = QueryCollator(tokenizer, texts, kg.relation_texts, kg.num_relations,
                             cfg.model.max_text_tokens)
    queries = select_queries(kg, "test", args.eval_triples)
    batch = args.eval_batch
    evaluate_model(model, collator, features, kg, split="test", batch_size=batch,
                   max_queries=args.eval_triples)  # warm-up (and the filter index)
    torch.cuda.synchronize()
    start = time.perf_counter()
    metrics = evaluate_model(model, collator, features, kg, split="test", batch_size=batch,
                             max_queries=args.eval_triples)
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    encode = statistics.median(timed(
        lambda: encode_queries(model, collator, features, queries, batch), 2))
    vectors = encode_queries(model, collator, features, queries, batch)
    table = model.entity_vectors().float()
    index = kg.filter_index()

    def rank(device: torch.device) -> None:
        rank_with_vectors(vectors.to(device), table.to(device), queries, index,
                          batch_size=1024, cosine=True, temperature=model.temperature)

    rank_gpu = statistics.median(timed(lambda: rank(CUDA), 3))
    rank_cpu = statistics.median(timed(lambda: rank(torch.device("cpu")), 2))
    n = len(queries)
    out = {"entities": kg.num_entities, "queries": n, "batch_size": batch,
           "evaluate_model_s": total, "evaluate_queries_per_s": n / total,
           "encode_queries_s": encode, "rank_gpu_s": rank_gpu, "rank_cpu_s": rank_cpu,
           "cpu_threads": torch.get_num_threads(), "mrr_random_model": metrics["overall"]["mrr"]}
    rows = [("evaluate_model (encode on GPU + rank)", f"{total:.2f}", f"{n / total:.0f}"),
            ("  encode queries (GPU)", f"{encode:.2f}", f"{n / encode:.0f}"),
            ("  rank, GPU", f"{rank_gpu:.3f}", f"{n / rank_gpu:.0f}"),
            ("  rank, CPU", f"{rank_cpu:.3f}", f"{n / rank_cpu:.0f}")]
    print(format_table(rows, ["step", "seconds", "queries/s"],
                       title=f"(c) evaluation: {n} queries x {kg.num_entities} entities, "
                             "tiny model, bf16 CUDA"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm-hidden", type=int, default=1024)
    parser.add_argument("--llm-layers", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=336, help="336/14 -> 576 tokens")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--extract-batches", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--extract-repeats", type=int, default=5)
    parser.add_argument("--eval-triples", type=int, default=2000)
    parser.add_argument("--eval-batch", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--parts", nargs="+", default=["compression", "extraction", "eval"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs CUDA (torch.cuda.is_available() is false)")
    if args.quick:
        args.llm_hidden, args.llm_layers, args.image_size, args.batch = 256, 2, 112, 4
        args.repeats, args.extract_batches, args.eval_triples = 2, [4], 100
    payload: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "dtype": "bfloat16",
                     "args": vars(args)}
    parts = {"compression": compression, "extraction": extraction, "eval": evaluation}
    for name in args.parts:
        start = time.perf_counter()
        payload[name] = parts[name](args)
        payload[name]["bench_seconds"] = time.perf_counter() - start
        payload["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    save("gpu" if not args.quick else "gpu_quick", payload)


if __name__ == "__main__":
    main()

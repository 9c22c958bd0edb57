"""Visual feature extraction: throughput and peak memory.

(a) images/s through a frozen vision tower: a plain single-process loop (decode +
    preprocess + encode, as ``features_from_shards`` does) vs. the Ray Data pipeline
    (``extract_features``) with 1 and 2 actors, for the tiny demo tower (64 px, patch 16,
    width 64, 2 layers) and a mid-size one (224 px, patch 16, width 256, 6 layers).
(b) peak memory of the pipeline (driver + every Ray process: summed RSS of the process tree,
    sampled by a thread) on the synthetic dataset at 1x and 4x the images
    (goal: the 4x peak within 1.3x of the 1x peak).

Every measurement runs in a fresh subprocess with its own local Ray session (2 CPUs).

    .venv/bin/python bench/bench_extract.py --quick     # small smoke run
    .venv/bin/python bench/bench_extract.py             # the figures of the report
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, save  # noqa: E402

sys.path.insert(0, str(REPO_ROOT))

from elmm_ray.tables import format_table  # noqa: E402

TOWERS = {
    "tiny": {"image_size": 64, "patch_size": 16, "vision_hidden": 64, "vision_layers": 2,
             "vision_heads": 4},
    "mid": {"image_size": 224, "patch_size": 16, "vision_hidden": 256, "vision_layers": 6,
            "vision_heads": 8},
}


def load_average() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


class TreeRss:
    """Peak of the summed RSS of this process and all its descendants (Ray's GCS, raylet,
    workers and actors are children of a driver that started Ray), sampled every 0.1 s."""

    def __init__(self, interval: float = 0.1) -> None:
        import psutil

        self.root = psutil.Process(os.getpid())
        self.interval = interval
        self.peak = 0.0
        self.processes_at_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> float:
        import psutil

        total, count = 0, 0
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
                count += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        mb = total / 2**20
        if mb > self.peak:
            self.peak, self.processes_at_peak = mb, count
        return mb

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeRss:
        self.baseline = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# ------------------------------------------------------------------------------ data


def prepare(work: Path, tower: str, entities: int) -> dict:
    """Synthetic KG -> packed shards, and the tower saved as a (tiny-LLM) Llava checkpoint."""
    from elmm_ray.data.kg import load_kg
    from elmm_ray.data.shards import pack_images
    from elmm_ray.data.synth import generate_synthetic_kg
    from elmm_ray.models.backbone import build_tiny_llava

    geometry = TOWERS[tower]
    data = work / f"data-{entities}-{geometry['image_size']}"
    generate_synthetic_kg(data, num_entities=entities, image_size=geometry["image_size"], seed=0)
    kg = load_kg(data)
    shards = work / f"shards-{entities}-{geometry['image_size']}"
    if "use_ray" in inspect.signature(pack_images).parameters:
        result = pack_images(kg, shards, show_progress=False, use_ray=False)
    else:
        from elmm_ray.config import RayConfig
        from elmm_ray.ray_session import init_ray

        init_ray(RayConfig(num_cpus=2))
        result = pack_images(kg, shards, show_progress=False)
    backbone = work / f"backbone-{tower}"
    if not (backbone / "config.json").is_file():
        model = build_tiny_llava(**geometry, llm_hidden=32, llm_layers=1, llm_heads=2,
                                 llm_kv_heads=1, llm_intermediate=64, vocab_size=128,
                                 image_token_id=1, pad_token_id=0, seed=0)
        model.save_pretrained(backbone)
    return {"tower": tower, "shards": str(shards), "backbone": str(backbone),
            "entities": kg.num_entities, "images": result.manifest["images_packed"],
            "image_size": geometry["image_size"]}


# ------------------------------------------------------------------------------ one run


def run_one(spec: dict) -> dict:
    """One measurement (in its own process): ``plain`` loop or the ``ray`` pipeline."""
    if spec["mode"] == "plain":
        import torch

        from elmm_ray.data.image_features import features_from_shards
        from elmm_ray.models.backbone import load_backbone, vision_tower_of

        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        tower = vision_tower_of(load_backbone(spec["backbone"]))
        with TreeRss() as rss:
            start = time.perf_counter()
            features_from_shards(tower, spec["shards"], num_entities=spec["entities"],
                                 max_images=10, image_size=spec["image_size"],
                                 batch_size=spec["batch_size"])
            seconds = time.perf_counter() - start
        return {"seconds": seconds, "images_per_s": spec["images"] / seconds,
                "first_part_s": float("nan"), "after_startup_images_per_s": float("nan"),
                "peak_rss_mb": rss.peak,
                "threads": torch.get_num_threads()}

    from elmm_ray.config import RayConfig
    from elmm_ray.data.extraction import extract_features
    from elmm_ray.ray_session import init_ray

    init_ray(RayConfig(num_cpus=2))
    stamps: list[tuple[float, int]] = []
    store = Path(spec["work"]) / f"store-{os.getpid()}"
    with TreeRss() as rss:
        start = time.perf_counter()
        result = extract_features(
            spec["shards"], store, backbone=spec["backbone"], max_images=10,
            actors=spec["actors"], batch_size=spec["batch_size"], part_rows=spec["part_rows"],
            show_progress=False,
            on_part=lambda s: stamps.append((time.perf_counter(), s["rows"])))
        end = time.perf_counter()
    done = result.manifest["counts"]["done"]
    first, first_rows = stamps[0] if stamps else (float("nan"), 0)
    return {"seconds": end - start, "images_per_s": done / (end - start),
            "first_part_s": first - start,
            # After the first committed part, start-up (actors, imports, model load) is over.
            "after_startup_images_per_s": (done - first_rows) / (end - first)
            if len(stamps) > 1 else float("nan"),
            "peak_rss_mb": rss.peak, "baseline_rss_mb": rss.baseline,
            "processes_at_peak": rss.processes_at_peak, "parts": len(stamps), "done": done}


def measure(spec: dict) -> dict:
    """Run :func:`run_one` in a fresh interpreter (fresh Ray session, clean peak RSS)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1",
               RAY_DATA_USE_DATASOURCE_V2="0", TOKENIZERS_PARALLELISM="false")
    load = load_average()
    proc = subprocess.run([sys.executable, __file__, "--run-one", json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[len("RESULT "):]), "load_average": [load, load_average()]}
    raise RuntimeError(f"measurement {spec['mode']} failed (rc {proc.returncode}):\n"
                       f"{proc.stderr[-4000:]}")


# ------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--tiny-entities", type=int, default=1000,
                        help="entities of the tiny-tower throughput dataset (~2.5 images each)")
    parser.add_argument("--mid-entities", type=int, default=200,
                        help="entities of the mid-tower throughput dataset")
    parser.add_argument("--memory-entities", type=int, default=1000,
                        help="entities of the 1x memory dataset (4x is four times this)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch")
    parser.add_argument("--part-rows", type=int, default=64, help="images per store part")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-mid", action="store_true")
    parser.add_argument("--output", default="",
                        help="name under bench/results/ (default: extract, extract_quick)")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        print("RESULT " + json.dumps(run_one(json.loads(args.run_one))), flush=True)
        return
    if args.quick:
        args.tiny_entities, args.mid_entities, args.memory_entities = 200, 40, 200
    args.output = args.output or ("extract_quick" if args.quick else "extract")

    results: dict = {"args": vars(args), "load_average_start": load_average(),
                     "throughput": {}, "memory": {}}
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        work = Path(tmp)
        towers = [("tiny", args.tiny_entities)] + ([] if args.skip_mid else
                                                   [("mid", args.mid_entities)])
        rows = []
        for tower, entities in towers:
            data = prepare(work, tower, entities)
            base = {**data, "work": str(work), "batch_size": args.batch_size,
                    "part_rows": args.part_rows}
            runs = {"plain loop": measure({**base, "mode": "plain"}),
                    "plain loop, 1 thread": measure({**base, "mode": "plain", "threads": 1})}
            for actors in (1, 2):
                runs[f"ray data, {actors} actor(s)"] = measure(
                    {**base, "mode": "ray", "actors": actors})
            plain = runs["plain loop"]["images_per_s"]
            best = max(plain, runs["plain loop, 1 thread"]["images_per_s"])
            for name, r in runs.items():
                r["ratio_to_plain"] = r["images_per_s"] / plain
                r["ratio_to_best_plain"] = r["images_per_s"] / best
                rows.append((f"{tower} ({TOWERS[tower]['image_size']}px, "
                             f"w{TOWERS[tower]['vision_hidden']}, "
                             f"L{TOWERS[tower]['vision_layers']})", name, f"{data['images']:,}",
                             f"{r['seconds']:.1f}", f"{r['first_part_s']:.1f}",
                             f"{r['images_per_s']:.1f}", f"{r['ratio_to_plain']:.2f}",
                             f"{r['ratio_to_best_plain']:.2f}",
                             f"{r['after_startup_images_per_s']:.0f}",
                             "{:.1f} / {:.1f}".format(*r["load_average"])))
            results["throughput"][tower] = {"images": data["images"], "runs": runs}
        print(format_table(rows, ["tower", "run", "images", "seconds", "1st part s", "img/s",
                                  "x plain", "x best plain", "img/s after start-up",
                                  "load before/after"],
                           title="Extraction throughput, wall clock incl. actor start-up "
                                 "(2-core machine)"))

        if not args.skip_memory:
            rows = []
            for scale in (1, 4):
                data = prepare(work, "tiny", args.memory_entities * scale)
                r = measure({**data, "work": str(work), "mode": "ray", "actors": 2,
                             "batch_size": args.batch_size, "part_rows": args.part_rows})
                results["memory"][f"{scale}x"] = {"images": data["images"], **r}
                rows.append((f"{scale}x", f"{data['images']:,}", f"{r['seconds']:.1f}",
                             f"{r['baseline_rss_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
                             str(r["processes_at_peak"]),
                             "{:.1f} / {:.1f}".format(*r["load_average"])))
            one, four = results["memory"]["1x"], results["memory"]["4x"]
            ratio = four["peak_rss_mb"] / one["peak_rss_mb"]
            marginal = (four["images"] - one["images"]) / (four["seconds"] - one["seconds"])
            results["memory"].update(peak_ratio_4x_to_1x=ratio, goal=1.3,
                                     marginal_images_per_s=marginal)
            print(format_table(rows, ["dataset", "images", "seconds", "RSS before MB",
                                      "peak RSS MB", "processes", "load before/after"],
                               title="Peak memory, driver + Ray processes (tiny tower, 2 actors)"))
            print(f"4x / 1x peak: {ratio:.2f} (goal <= 1.3): "
                  f"{'met' if ratio <= 1.3 else 'NOT met'}; marginal rate 1x -> 4x (fixed "
                  f"start-up cancelled out): {marginal:.0f} images/s")
    results["load_average_end"] = load_average()
    print(f"load average: {results['load_average_start']} at start, "
          f"{results['load_average_end']} at the end (other processes share the 2 cores)")
    save(args.output, results)


if __name__ == "__main__":
    main()

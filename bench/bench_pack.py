"""Pack throughput (images/s) on the synthetic set: in-process vs Ray Data with 1 and 2 CPUs.

Each variant runs in a fresh subprocess (its own Ray session) over the same images into a
fresh output folder. Reported: wall seconds of `pack_images` alone (Ray start-up excluded,
reported separately) and images/s.

    python bench/bench_pack.py [--entities 1000 --max-images 6 --image-size 192]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, save  # noqa: E402

from elmm_ray.data.synth import generate_synthetic_kg  # noqa: E402
from elmm_ray.tables import format_table  # noqa: E402

WORKER = """
import json, sys, time
t0 = time.perf_counter()
from elmm_ray.data.kg import load_kg
from elmm_ray.data.shards import pack_images
data, out, cpus = sys.argv[1], sys.argv[2], int(sys.argv[3])
kg = load_kg(data)
startup = 0.0
if cpus:
    from elmm_ray.config import RayConfig
    from elmm_ray.ray_session import init_ray
    t = time.perf_counter(); init_ray(RayConfig(num_cpus=cpus)); startup = time.perf_counter() - t
t = time.perf_counter()
res = pack_images(kg, out, max_shard_bytes=int(sys.argv[4]), show_progress=False,
                  use_ray=bool(cpus), num_cpus_per_task=1.0)
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "ray_startup_s": startup,
                  "images": res.manifest["images_listed"], "shards": len(res.manifest["shards"])}))
"""


def run_variant(data: Path, out: Path, cpus: int, shard_bytes: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", WORKER, str(data), str(out), str(cpus),
                           str(shard_bytes)], capture_output=True, text=True, cwd=REPO_ROOT,
                          check=False)
    if proc.returncode:
        raise RuntimeError(f"pack variant cpus={cpus} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["images_per_s"] = result["images"] / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entities", type=int, default=1000)
    parser.add_argument("--max-images", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument("--shard-mb", type=float, default=2.0, help="shard size bound (MB)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.entities, args.max_images, args.image_size = 200, 4, 96
    with tempfile.TemporaryDirectory(prefix="bench_pack_") as tmp:
        data = Path(tmp) / "data"
        report = generate_synthetic_kg(data, num_entities=args.entities, min_images=1,
                                       max_images=args.max_images, image_size=args.image_size)
        shard_bytes = int(args.shard_mb * 1e6)
        results = {name: run_variant(data, Path(tmp) / f"out_{name}", cpus, shard_bytes)
                   for name, cpus in (("in_process", 0), ("ray_1cpu", 1), ("ray_2cpu", 2))}
    base = results["ray_1cpu"]["images_per_s"]
    rows = [(name, r["images"], r["shards"], f"{r['seconds']:.2f}", f"{r['ray_startup_s']:.1f}",
             f"{r['images_per_s']:.0f}", f"{r['images_per_s'] / base:.2f}")
            for name, r in results.items()]
    print(format_table(rows, ["variant", "images", "shards", "pack s", "ray start s",
                              "images/s", "vs ray 1 CPU"],
                       title=f"pack throughput: {report.images_written} synthetic images "
                             f"({args.image_size}px)"))
    save("pack", {"args": vars(args), "images_written": report.images_written,
                  "results": results,
                  "speedup_2cpu_over_1cpu": results["ray_2cpu"]["images_per_s"] / base})


if __name__ == "__main__":
    main()

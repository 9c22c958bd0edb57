"""Ray job: extract visual features of the packed images into the feature store.

    ray job submit --working-dir . -- python jobs/extract.py --config configs/demo.yaml \
        [key=value ...] [--entity-init]

The synthetic data and the image shards are produced first when missing (both steps are
skipped when already complete). On a cluster, give ``run_dir`` an absolute path on shared
storage: a relative one resolves inside the job's temporary working directory.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # elmm_ray from --working-dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. ray.data_actors=2")
    parser.add_argument("--no-pack", action="store_true",
                        help="do not synthesise/pack missing inputs (fail instead)")
    parser.add_argument("--entity-init", action="store_true",
                        help="also encode every entity into <run_dir>/entity_init.safetensors")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from elmm_ray import pipeline
    from elmm_ray.config import load_config
    from elmm_ray.rundir import RunDir
    from elmm_ray.tables import format_table

    cfg = load_config(args.config, args.overrides)
    RunDir(cfg.run_dir).write_config(cfg)
    if not args.no_pack:
        pipeline.run_synth(cfg)
    kg = pipeline.load_dataset(cfg)
    if not args.no_pack:
        pipeline.run_pack(cfg, kg, show_progress=not args.quiet)
    result = pipeline.run_extract(cfg, kg, show_progress=not args.quiet)
    print(format_table(result.summary_rows(), title=f"feature store {result.store_dir}"))
    failed = result.manifest["failed_images"]
    for item in failed[:20]:
        print(f"  failed: {item['entity_id']} image {item['image_index']}: {item['reason']}")
    if len(failed) > 20:
        print(f"  ... and {len(failed) - 20} more (listed in the store's manifest.json)")
    if args.entity_init:
        info = pipeline.run_entity_init(cfg, kg, show_progress=not args.quiet)
        rows = [("entities", f"{info['entities']:,}"), ("width", str(info["embed_dim"])),
                ("seconds", f"{info['seconds']:.1f}"),
                ("status", "already complete (no work)" if info["skipped_rerun"] else "complete")]
        print(format_table(rows, title=f"initial entity table {info['path']}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

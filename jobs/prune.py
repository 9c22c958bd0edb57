"""Ray job: the prune stage (pruning + fine-tuning + report) of a trained run.

    ray job submit --working-dir . -- python jobs/prune.py --config configs/demo.yaml \
        prune.method=knowledge prune.ratio=0.3
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. prune.ratio=0.5")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from elmm_ray.config import load_config
    from elmm_ray.pruning.run import run_prune

    cfg = load_config(args.config, args.overrides)
    payload = run_prune(cfg, show_progress=not args.quiet)
    print(json.dumps({"rows": payload["rows"]}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

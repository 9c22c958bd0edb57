"""Ray job: `elmm-ray tune` on a cluster: a Ray Tune sweep over config keys.
Upstream stages shared by every trial run once first.

    ray job submit --working-dir . -- \
        python jobs/tune.py --config configs/demo.yaml --space tune_spaces/compression.yaml

Same entry as the CLI (`elmm_ray.cli.job_main`). On a cluster give ``run_dir`` an absolute
path on shared storage: a relative one resolves inside the job's working directory.
"""

import sys

from elmm_ray.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("tune"))

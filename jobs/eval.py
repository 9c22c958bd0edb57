"""Ray job: `elmm-ray eval` on a cluster: filtered ranking of the trained model.
Upstream stages run first when they are missing.

    ray job submit --working-dir . -- \
        python jobs/eval.py --config configs/demo.yaml [key=value ...]

Same entry as the CLI (`elmm_ray.cli.job_main`). On a cluster give ``run_dir`` an absolute
path on shared storage: a relative one resolves inside the job's working directory.
"""

import sys

from elmm_ray.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("eval"))

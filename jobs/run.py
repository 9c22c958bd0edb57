"""Ray job: `elmm-ray run` on a cluster.

    ray job submit --working-dir . -- \
        python jobs/run.py --config configs/demo.yaml [key=value ...]
"""

import sys

from elmm_ray.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("run"))

"""Ray job: `elmm-ray train` on a cluster.

    ray job submit --working-dir . -- \
        python jobs/train.py --config configs/demo.yaml [key=value ...]
"""

import sys

from elmm_ray.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("train"))

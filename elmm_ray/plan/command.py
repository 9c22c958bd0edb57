"""`elmm-ray plan` and the plan check of `elmm-ray run`: the command-line side of
:mod:`elmm_ray.plan` (the heavy imports happen when a plan is made)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from elmm_ray.plan import DEFAULT_MFU

IGNORE_ENV = "ELMM_IGNORE_PLAN"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `elmm-ray plan` (after CONFIG and the key=value overrides)."""
    parser.add_argument("--cluster", default=None, help="a Ray launcher or KubeRay file of "
                        "cluster/: its GPU instance type gives the GPU and the price "
                        "(elmm_ray/plan/prices.yaml, dated); default: one A100-80GB per "
                        "worker, no price")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--space", default=None, help="also cost a sweep: tune_spaces/NAME.yaml")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                        help=f"model-FLOPs utilisation the times assume (default {DEFAULT_MFU})")


def run_plan_command(cfg, args: argparse.Namespace) -> int:
    """Print the plan (table or JSON); exit status 3 when it does not fit."""
    from elmm_ray.plan.report import format_plan, format_space, make_plan, space_plan, summary_line

    plan = make_plan(cfg, args.cluster, args.mfu)
    if args.space:
        plan["sweep"] = space_plan(cfg, args.space, args.cluster, args.mfu)
    if args.json:
        print(json.dumps(plan, indent=2, default=str))
    else:
        print(format_plan(plan))
        if args.space:
            print(format_space(plan["sweep"]))
        print(summary_line(plan))
    return 0 if plan["fits"] else 3


def check_before_run(cfg, ignore: bool = False) -> None:
    """Before a GPU run: print the plan's one-line summary; refuse a plan that does not fit
    (a ``ValueError`` naming why and the remedies) unless ``ignore`` (``--ignore-plan``, or
    ``ELMM_IGNORE_PLAN=1`` for `ray job submit`). A plan that cannot be made (no dataset
    counts, no config.json offline) is said and the run goes on."""
    from elmm_ray.plan.meta import CheckpointUnavailable, PlanError
    from elmm_ray.plan.report import make_plan, summary_line

    ignore = ignore or os.environ.get(IGNORE_ENV, "") not in ("", "0")
    try:
        plan = make_plan(cfg)
    except PlanError as err:
        if not ignore and not isinstance(err, CheckpointUnavailable):
            raise  # a shape mismatch: the run would fail on its GPUs
        print(f"[plan] no plan before this run ({err})", file=sys.stderr)
        return
    except (OSError, ValueError) as err:
        print(f"[plan] no plan before this run ({err})", file=sys.stderr)
        return
    print(summary_line(plan))
    if not plan["fits"] and not ignore:
        remedies = "; ".join(plan["remedies"]) or "a bigger GPU"
        raise ValueError(f"the plan of this config does not fit: {'; '.join(plan['reasons'])}."
                         f" What would make it fit: {remedies}. `elmm-ray plan CONFIG` shows "
                         f"the whole plan; --ignore-plan (or {IGNORE_ENV}=1) runs anyway")

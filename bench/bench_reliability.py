"""Reliability: the fault matrix of ``tests/faultmatrix.py``. Every stage (pack, extract,
entity init, train worker and driver, eval, prune, export, Tune trial and driver) is
SIGKILLed at seeded points (``ELMM_FAULT=POINT:N``: the N-th occurrence of a commit
boundary, or a watchdog that kills the driver's process group once a file appears), the same
command is rerun until it completes, and the run directory is compared with an uninterrupted
run of the same config: rows lost and duplicated (packed shards, feature store, per-step
losses, metrics records, Tune trials; must be 0) and the largest deviation of any output
(features, entity table, trained weights, metrics, exported tensors; tolerance 1e-6).

Prints one row per case and the counts of ``bench/results/fuzz.json`` (bad-input fuzzing,
``bench/bench_fuzz.py``), and writes ``bench/results/reliability.json``.

    python bench/bench_reliability.py [--quick] [--only NAME ...] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/faultmatrix.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import RESULTS, save  # noqa: E402

from elmm_ray.tables import format_table  # noqa: E402
from tests import faultmatrix as fm  # noqa: E402


def fuzz_counts() -> dict | None:
    """The totals of the last bad-input fuzzing run (``bench/bench_fuzz.py``)."""
    path = RESULTS / "fuzz.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return {"cases": data["cases"], "totals": data["totals"], "command": data["command"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"only {', '.join(fm.QUICK_CASES)} (no Tune)")
    parser.add_argument("--only", nargs="*", default=None, help="case names to run")
    parser.add_argument("--work", default=None, help="keep the run directories here")
    args = parser.parse_args()
    names = args.only or (fm.QUICK_CASES if args.quick else None)
    ray_cases = [c for c in fm.RAY_CASES if names is None or c.name in names]
    tune_cases = [c for c in fm.TUNE_CASES if names is None or c.name in names]
    start = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="elmm_reliability_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    if ray_cases:
        base_run, base = fm.baseline(work, fm.RAY_RUN)
        print(f"baseline: {base_run} ({time.perf_counter() - start:.0f} s)", flush=True)
        for case in ray_cases:
            rows.append(fm.run_case(case, base_run, base, work, overrides=fm.RAY_RUN))
            print(json.dumps(rows[-1]), flush=True)
    if tune_cases:
        space = work / "lr.yaml"
        space.write_text(fm.TUNE_SPACE)
        for case in tune_cases:
            case.extra = ["--space", str(space)]
        _, tune_base = fm.baseline(work, fm.TUNE_RUN, "tune", extra=["--space", str(space)])
        for case in tune_cases:
            rows.append(fm.run_case(case, work / "none", tune_base, work,
                                    overrides=fm.TUNE_RUN))
            print(json.dumps(rows[-1]), flush=True)
    table = [(r["case"], r["fault"], r["target"], "yes" if r["fired"] else "NO",
              " ".join(str(c) for c in r["exit_codes"]), "yes" if r["finished"] else "NO",
              r["rows_lost"], r["rows_duplicated"],
              "-" if r["max_deviation"] is None else f"{r['max_deviation']:.1e}",
              "yes" if r["survived"] else "NO") for r in rows]
    print(format_table(table, ["case", "fault", "killed", "fired", "exit codes", "finished",
                               "rows lost", "dup rows", "max dev", "survived"],
                       title="fault matrix (SIGKILL, rerun, compare with an uninterrupted run)"))
    for r in rows:
        for problem in r["problems"]:
            print(f"  {r['case']}: {problem}")
    fuzz = fuzz_counts()
    if fuzz:
        print(f"fuzz ({fuzz['command']}): {fuzz['cases']} cases, totals {fuzz['totals']}")
    summary = {"faults_injected": sum(r["fired"] for r in rows), "cases": len(rows),
               "runs_finished": sum(r["finished"] for r in rows),
               "rows_lost": sum(r["rows_lost"] or 0 for r in rows),
               "rows_duplicated": sum(r["rows_duplicated"] or 0 for r in rows),
               "max_deviation": max((r["max_deviation"] or 0.0 for r in rows), default=0.0),
               "survived": sum(r["survived"] for r in rows), "tolerance": fm.TOLERANCE}
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    save("reliability" + ("_quick" if args.quick or args.only else ""), {
        "command": "python bench/bench_reliability.py" + (" --quick" if args.quick else "")
        + (f" --only {' '.join(args.only)}" if args.only else ""),
        "seconds": round(time.perf_counter() - start, 1), "summary": summary,
        "config": fm.RAY_RUN, "tune_config": fm.TUNE_RUN, "cases": rows, "fuzz": fuzz})
    return 0 if summary["survived"] == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

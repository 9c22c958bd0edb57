"""Bad-input fuzzing: the seeded mutation matrix of ``tests/fuzz.py`` over every dataset file
kind (MKGformer, OpenKE, MyGO), a config and a search-space YAML, and image files.

Prints one row per file kind and mutation (cases, loaded with warnings and how many,
loaded unchanged, text edits, failed cleanly and how many named file:line, silent, crashed)
and writes ``bench/results/fuzz.json``. Crashed (a traceback, or a CLI exit other than
0 / 2) and silent (a changed graph without a warning) must be 0.

    python bench/bench_fuzz.py [--seeds 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/fuzz.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import save  # noqa: E402

from elmm_ray.tables import format_table  # noqa: E402
from tests import fuzz  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=2, help="seeds per text mutation")
    args = parser.parse_args()
    start = time.perf_counter()
    cases: list[fuzz.Case] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases += fuzz.dataset_cases(work / "data", seeds=args.seeds)
        for kind in ("config", "space"):
            cases += fuzz.yaml_cases(work / kind, kind, seeds=args.seeds)
        for case in cases:  # the same text on every run
            case.message = case.message.replace(str(work), "<tmp>")
    cases += [fuzz.judge_image(m, s, d) for m, s, d in fuzz.image_inputs(seeds=3)]
    seconds = time.perf_counter() - start

    groups: dict[tuple[str, str], list[fuzz.Case]] = defaultdict(list)
    for case in cases:
        groups[(case.kind, case.mutation)].append(case)
    rows, table = [], []
    for (kind, mutation), group in groups.items():
        count = {o: sum(c.outcome == o for c in group) for o in fuzz.OUTCOMES}
        warned = [c for c in group if c.outcome == "loaded_warned"]
        failed = [c for c in group if c.outcome == "failed"]
        row = {"kind": kind, "mutation": mutation, "cases": len(group), **count,
               "warnings": sum(c.warnings for c in warned),
               "failed_file_line": sum(c.warnings for c in failed if c.kind != "image"),
               "examples": sorted({c.message for c in group if c.message})[:3]}
        rows.append(row)
        table.append((kind, mutation, len(group),
                      f"{count['loaded_warned']} ({row['warnings']})", count["loaded_same"],
                      count["text_edit"], f"{count['failed']} ({row['failed_file_line']})",
                      count["silent"], count["crashed"]))
    totals = {o: sum(r[o] for r in rows) for o in fuzz.OUTCOMES}
    print(format_table(table, ["file kind", "mutation", "cases", "warned (warnings)",
                               "same", "text edit", "failed (file:line)", "silent",
                               "crashed"], title="bad-input fuzzing"))
    reasons: dict[str, int] = defaultdict(int)
    for c in cases:
        if c.kind == "image":
            reasons[c.message if c.outcome == "failed" else c.message.split(" orientation")[0]
                    + (" (EXIF orientation applied)" if c.mutation == "exif_orientation"
                       else "")] += 1
    print(format_table(sorted(reasons.items()), ["image outcome", "cases"],
                       title="images by reason"))
    print(f"{len(cases)} cases in {seconds:.1f} s: " + ", ".join(
        f"{o} {n}" for o, n in totals.items()))
    save("fuzz", {"command": "python bench/bench_fuzz.py --seeds " + str(args.seeds),
                  "seconds": round(seconds, 1), "cases": len(cases), "totals": totals,
                  "image_reasons": dict(reasons), "rows": rows,
                  "defects": [vars(c) for c in cases if c.outcome in ("silent", "crashed")]})
    return 1 if totals["crashed"] or totals["silent"] else 0


if __name__ == "__main__":
    sys.exit(main())

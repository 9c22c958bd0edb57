"""Loading the real KGs of ../shared/data: seconds per dataset (goal: FB15k-237 under 5 s).

    python bench/bench_load.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import SHARED_DATA, save  # noqa: E402

from elmm_ray.data.kg import load_kg  # noqa: E402
from elmm_ray.tables import format_table  # noqa: E402

DATASETS = ["FB15k-237", "WN18", "DB15K", "MKG-W"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not SHARED_DATA.is_dir():
        sys.exit(f"real datasets not found at {SHARED_DATA}")
    results = {}
    for name in DATASETS:
        load_times, filter_times = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            kg = load_kg(SHARED_DATA / name)
            t1 = time.perf_counter()
            kg.filter_index()
            kg.relation_categories  # noqa: B018 - computed property, timed on purpose
            filter_times.append(time.perf_counter() - t1)
            load_times.append(t1 - t0)
        results[name] = {
            "entities": kg.num_entities, "relations": kg.num_relations,
            "triples": sum(len(t) for t in kg.triples.values()),
            "load_s_median": sorted(load_times)[len(load_times) // 2],
            "filter_index_and_categories_s_median": sorted(filter_times)[len(filter_times) // 2],
        }
    rows = [(n, f"{r['triples']:,}", f"{r['load_s_median']:.2f}",
             f"{r['filter_index_and_categories_s_median']:.2f}") for n, r in results.items()]
    print(format_table(rows, ["dataset", "triples", "load s", "filter+categories s"],
                       title=f"KG loading (median of {args.repeats})"))
    fb = results["FB15k-237"]
    total = fb["load_s_median"] + fb["filter_index_and_categories_s_median"]
    print(f"FB15k-237 load + filter index: {total:.2f} s (goal < 5 s): "
          f"{'met' if total < 5 else 'NOT met'}")
    save("load", {"repeats": args.repeats, "datasets": results, "goal_fb15k237_s": 5.0,
                  "fb15k237_total_s": total})


if __name__ == "__main__":
    main()

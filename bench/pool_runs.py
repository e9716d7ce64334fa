"""Pool several runs of ``bench/round_overhead.py --repeats K`` into one verdict against a target.

Why: on this 2-core machine the ratio of a simulation to its ideal moves by more from one run to
the next (1.25x to 1.71x for the same code) than the changes worth measuring, mostly because the
single-process reference does. One run's median can land on either side of a target; the runs
kept in ``docs/bench/tiny_clients_runs.json`` (each a ``round_overhead.py`` JSON plus the commit
it ran) say more together. This prints each run's median and range, the median of every
interleaved ratio pooled, and how many of them met the target, for the ratio to the ideal and
for the ratio to the plain loop in two processes where the runs recorded it.

    python bench/pool_runs.py docs/bench/tiny_clients_runs.json --target 1.5
    python bench/pool_runs.py docs/bench/tiny_clients_runs.json --from-run 8   # one code's runs
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RATIOS = {"flower-over-ideal-repeats": "Flower / ideal",
          "flower-over-parallel-plain-repeats": "Flower / plain loop in 2 processes"}


def pooled(runs: list[dict], key: str, target: float) -> dict | None:
    """Per-run medians and ranges of ``key`` and the verdict over every ratio pooled; None when
    no run recorded ``key``."""
    per_run = [(run.get("simulation-commit", "?"), run[key]) for run in runs if run.get(key)]
    if not per_run:
        return None
    ratios = [ratio for _, values in per_run for ratio in values]
    return {"runs": [{"commit": commit, "median": statistics.median(values), "min": min(values),
                      "max": max(values), "count": len(values)} for commit, values in per_run],
            "pooled-median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "count": len(ratios), "at-or-under-target": sum(ratio <= target for ratio in ratios),
            "target": target}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_file", type=Path,
                        help='a JSON object with "runs": [round_overhead.py JSON, ...]')
    parser.add_argument("--target", type=float, default=1.5, help="the ratio to meet (default 1.5)")
    parser.add_argument("--from-run", type=int, default=1,
                        help="pool runs N.. of the file only (1-based), e.g. those of one code change")
    args = parser.parse_args()
    if args.from_run < 1:
        parser.error("--from-run: a run number, 1 or more")
    try:
        runs = json.loads(args.runs_file.read_text())["runs"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"{args.runs_file}: not a runs file ({err}); it needs a JSON object with a "
                         '"runs" list of bench/round_overhead.py results') from None
    runs = runs[args.from_run - 1:]
    found = False
    for key, label in RATIOS.items():
        verdict = pooled(runs, key, args.target)
        if verdict is None:
            continue
        found = True
        print(f"{label}:")
        for i, run in enumerate(verdict["runs"], args.from_run):
            print(f"  run {i} ({run['commit']}): median {run['median']:.2f}x "
                  f"(range {run['min']:.2f}-{run['max']:.2f}, {run['count']} simulations)")
        print(f"  pooled: median {verdict['pooled-median']:.3f}x of {verdict['count']} "
              f"(range {verdict['min']:.2f}-{verdict['max']:.2f}); "
              f"{verdict['at-or-under-target']} of {verdict['count']} at or under {args.target}x")
    if not found:
        raise SystemExit(f"{args.runs_file}: no run holds {' or '.join(RATIOS)} "
                         "(made by bench/round_overhead.py --repeats K)")


if __name__ == "__main__":
    main()

"""Two methods of one benchmark store, paired user by user: is a gap between them noise?

For every (protocol, K, n) both methods ran, it prints the mean over seeds of ``A − B`` (macro
test accuracy) and a 95% percentile bootstrap interval over (seed, user) units: each seed's
cell holds the same K users for both methods, so a user's accuracy difference in one seed is
one paired observation, and resampling them measures how much the gap owes to which users were
drawn. It does not measure the training noise between seeds; the per-seed gaps show that.

    python benchmarks/paired_methods.py STORE.json sharelora independent
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

from paired_stores import _natural

from sharelora.evaluate import bootstrap_ci


def paired(store: dict, a: str, b: str) -> list[str]:
    """Markdown rows, one per (protocol, K, n) where both methods ran in some seed."""
    groups = defaultdict(list)  # "protocol K n" -> [(cell of a, cell of b)] over seeds
    cells = store["cells"]
    for key, cell in cells.items():
        other = key.removesuffix(f" {a}") + f" {b}"
        if cell["method"] == a and other in cells:
            groups[re.sub(r" seed=\d+ .*", "", key)].append((cell, cells[other]))
    lines = [
        f"| cell | seeds | {a} | {b} | {a} − {b} (per seed) | 95% interval over users |",
        "|---|---:|---:|---:|---|---|",
    ]
    for group in sorted(groups, key=_natural):
        pairs = groups[group]
        diffs = [
            x["users"][u] - y["users"][u] for x, y in pairs for u in x["users"] if u in y["users"]
        ]
        low, high = bootstrap_ci(diffs, 0, 2000)
        mean_a = statistics.mean(x["macro_accuracy"] for x, _ in pairs)
        mean_b = statistics.mean(y["macro_accuracy"] for _, y in pairs)
        per_seed = ", ".join(
            f"{100 * (x['macro_accuracy'] - y['macro_accuracy']):+.1f}" for x, y in pairs
        )
        lines.append(
            f"| {group} | {len(pairs)} | {mean_a:.3f} | {mean_b:.3f} | "
            f"{100 * (mean_a - mean_b):+.1f} ({per_seed}) | [{100 * low:+.1f}, {100 * high:+.1f}] |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store", type=Path)
    p.add_argument("a", help="a method of the store, e.g. sharelora")
    p.add_argument("b", help="the method to set it against, e.g. independent")
    args = p.parse_args()
    store = json.loads(args.store.read_text())
    rows = paired(store, args.a, args.b)
    if len(rows) == 2:
        raise SystemExit(f"{args.store} has no cell where both {args.a} and {args.b} ran")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

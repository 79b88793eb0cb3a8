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
from collections import defaultdict
from pathlib import Path

from paired_stores import _natural, gap_columns

from sharelora.evaluate import bootstrap_ci


def paired(store: dict, a: str, b: str) -> list[str]:
    """Markdown rows, one per (protocol, K, n) where both methods ran in some seed."""
    groups = defaultdict(list)  # "protocol K n" -> [(cell of b, cell of a)] over seeds
    cells = store["cells"]
    for key, cell in cells.items():
        other = key.removesuffix(f" {a}") + f" {b}"
        if cell["method"] == a and other in cells:
            groups[re.sub(r" seed=\d+ .*", "", key)].append((cells[other], cell))
    lines = [
        f"| cell | seeds | {b} | {a} | {a} − {b} (per seed) | 95% interval over users |",
        "|---|---:|---:|---:|---|---|",
    ]
    for group in sorted(groups, key=_natural):
        pairs = groups[group]
        diffs = [
            y["users"][u] - x["users"][u] for x, y in pairs for u in y["users"] if u in x["users"]
        ]
        low, high = bootstrap_ci(diffs, 0, 2000)
        interval = f"[{100 * low:+.1f}, {100 * high:+.1f}]"
        lines.append(f"| {group} | {len(pairs)} | {gap_columns(pairs)} | {interval} |")
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

"""Two benchmark stores of the same cells under two settings, paired cell by cell.

Each store is the JSON of ``real_jester.py``, ``real_llmfao.py`` or ``real_ukp.py`` (cells keyed
``[protocol] K=.. n=.. seed=.. method``). For every cell that both hold, it prints the macro test
accuracy under each setting and their difference, averaged over the seeds both ran (paired by
seed), and, where the cells kept their validation losses (``shrinkage_val``), how many seeds'
validation preferred the second setting: the lower best calibrated loss, as ``strength="auto"``
would have judged it. That column is the choice validation would have made, to set beside the
test's difference; the last column is the test accuracy of that choice, seed by seed (what
``prior="auto"`` gives when the two stores differ only in ``--prior``, both in its grid).

    python benchmarks/paired_stores.py BASE.json OTHER.json [--methods sharelora,independent]
        [--json CHOSEN.json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path


def best_val_loss(cell: dict) -> float | None:
    tried = cell.get("shrinkage_val") or {}
    return min((t["calibrated_loss"] for t in tried.values()), default=None)


def choose(base_cell: dict, other_cell: dict) -> dict:
    """The cell validation prefers: ``other_cell`` where its best calibrated loss is lower."""
    a, b = best_val_loss(base_cell), best_val_loss(other_cell)
    return other_cell if a is not None and b is not None and b < a else base_cell


def chosen_store(base: dict, other: dict) -> dict:
    """A store of validation's choice in every cell both hold (for ``paired_methods.py``)."""
    return {
        "settings": {"base": base.get("settings"), "other": other.get("settings")},
        "cells": {k: choose(c, other["cells"][k]) for k, c in base["cells"].items()
                  if k in other["cells"]},
    }  # fmt: skip


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def gap_columns(pairs: list[tuple[dict, dict]]) -> str:
    """``mean x | mean y | y − x (per seed)`` of macro accuracy over paired cells ``(x, y)``."""
    a = [x["macro_accuracy"] for x, _ in pairs]
    b = [y["macro_accuracy"] for _, y in pairs]
    diffs = ", ".join(f"{100 * (y - x):+.1f}" for x, y in zip(a, b, strict=True))
    gap = 100 * (statistics.mean(b) - statistics.mean(a))
    return f"{statistics.mean(a):.3f} | {statistics.mean(b):.3f} | {gap:+.1f} ({diffs})"


def paired(base: dict, other: dict, methods: list[str] | None) -> list[str]:
    """Markdown rows: one per (setting of the cell without its seed, method)."""
    groups = defaultdict(list)  # "protocol K n method" -> [(base cell, other cell)]
    for key, cell in other["cells"].items():
        if key in base["cells"] and (methods is None or cell["method"] in methods):
            groups[re.sub(r" seed=\d+", "", key)].append((base["cells"][key], cell))
    lines = [
        "| cell | seeds | base | other | other − base (per seed) | validation prefers other "
        "| validation's choice |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for group in sorted(groups, key=_natural):
        pairs = groups[group]
        judged = [(a, b) for a, b in pairs if None not in (best_val_loss(a), best_val_loss(b))]
        votes = f"{sum(choose(a, b) is b for a, b in judged)}/{len(judged)}" if judged else "—"
        chosen = "—"
        if len(judged) == len(pairs):
            chosen = f"{statistics.mean(choose(a, b)['macro_accuracy'] for a, b in pairs):.3f}"
        lines.append(f"| {group} | {len(pairs)} | {gap_columns(pairs)} | {votes} | {chosen} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", type=Path)
    p.add_argument("other", type=Path)
    p.add_argument("--methods", help="comma-separated; default: every method both stores hold")
    p.add_argument("--json", type=Path, help="write the store of validation's choices here")
    args = p.parse_args()
    base, other = (json.loads(path.read_text()) for path in (args.base, args.other))
    print(f"base: {args.base} {base.get('settings')}\nother: {args.other} {other.get('settings')}")
    print("\n".join(paired(base, other, args.methods and args.methods.split(","))))
    if args.json:
        args.json.write_text(json.dumps(chosen_store(base, other), indent=1))


if __name__ == "__main__":
    main()

"""Tables, per-worker table, plot and time accounting for ``real_ukp.py``'s results JSON.

    python benchmarks/ukp_report.py [--json FILE]

Writes FILE.md (methods × n per K: macro accuracy mean ± sd over seeds, micro
accuracy, chosen strengths, the per-worker table for the headline setting, the time spent and
the estimated time of the full grid) and a plot of macro accuracy against n, one line per
method, to FILE.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADLINE = (20, "50")
GRID = {"K": [20, 5], "n": ["25", "50", "100", "all"], "seeds": 3}


def _n_key(n: str) -> float:
    return float("inf") if n == "all" else int(n)


def _groups(cells: list[dict]) -> dict[tuple, list[dict]]:
    """(K, n, method) -> the cells of every seed run."""
    out = defaultdict(list)
    for c in cells:
        out[(c["K"], c["n"], c["method"])].append(c)
    return out


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    sd_text = f" ± {sd:.3f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.3f}{sd_text} ({len(values)})"


def tables(cells: list[dict], methods: list[str]) -> str:
    groups = _groups(cells)
    lines = []
    for k in sorted({c["K"] for c in cells}, reverse=True):
        ns = sorted({c["n"] for c in cells if c["K"] == k}, key=_n_key)
        for key, title in (
            ("macro_accuracy", "macro test accuracy"),
            ("micro_accuracy", "micro test accuracy"),
        ):
            lines += [
                f"**K = {k} workers, {title}** (mean ± sd over seeds; runs in brackets)",
                "",
                "| method | " + " | ".join(f"n={n}" for n in ns) + " |",
                "|---|" + "---:|" * len(ns),
            ]
            for method in methods:
                row = [
                    _mean_sd([c[key] for c in groups[(k, n, method)]])
                    if groups.get((k, n, method))
                    else "—"
                    for n in ns
                ]
                if any(r != "—" for r in row):
                    lines.append(f"| {method} | " + " | ".join(row) + " |")
            lines.append("")
        lines += [
            f"**K = {k}: personalization strength chosen on validation** (per seed)",
            "",
            "| method | " + " | ".join(f"n={n}" for n in ns) + " |",
            "|---|" + "---:|" * len(ns),
        ]
        for method in methods:
            row = [
                ", ".join(
                    f"{c['strength']:g}"
                    for c in sorted(groups[(k, n, method)], key=lambda c: c["seed"])
                )
                or "—"
                for n in ns
            ]
            if method.partition("+")[0] != "shared" and any(r != "—" for r in row):
                lines.append(f"| {method} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def worker_table(cells: list[dict], methods: list[str], k: int, n: str) -> str:
    """Per-worker test accuracy at (K, n), mean over seeds."""
    groups = _groups(cells)
    present = [m for m in methods if groups.get((k, n, m))]
    if not present:
        return ""
    workers = sorted({u for m in present for c in groups[(k, n, m)] for u in c["users"]})
    lines = [
        f"**Per worker, K = {k}, n = {n}** (test accuracy, mean over seeds)",
        "",
        "| worker | " + " | ".join(present) + " |",
        "|---|" + "---:|" * len(present),
    ]
    for w in workers:
        vals = [statistics.mean(c["users"][w] for c in groups[(k, n, m)]) for m in present]
        best = max(vals)
        shown = [f"**{v:.3f}**" if v == best else f"{v:.3f}" for v in vals]
        lines.append(f"| {w} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


def timing(cells: list[dict], methods: list[str]) -> str:
    """Time spent, and the full grid's estimate from the mean per-method time at each (K, n)."""
    spent = sum(c["seconds"] for c in cells)
    per = defaultdict(list)
    for c in cells:
        per[(c["K"], c["n"])].append(c["seconds"])
    known = [s for v in per.values() for s in v]
    total = 0.0
    missing = []
    for k in GRID["K"]:
        for n in GRID["n"]:
            if per.get((k, n)):
                mean = statistics.mean(per[(k, n)])
            else:
                missing.append(f"K={k} n={n}")
                mean = statistics.mean(known) if known else 0.0
            total += mean * GRID["seeds"] * len(methods)
    note = f" (no measurement at {', '.join(missing)}: mean of the others used)" if missing else ""
    grid = len(GRID["K"]) * len(GRID["n"]) * GRID["seeds"] * len(methods)
    return (
        f"Cells run: {len(cells)} of {grid}; "
        f"their time: {spent / 3600:.1f} h. The full grid ({len(methods)} methods, K ∈ "
        f"{GRID['K']}, n ∈ {GRID['n']}, {GRID['seeds']} seeds) is estimated at "
        f"{total / 3600:.1f} h on this machine{note}.\n"
    )


def plot(cells: list[dict], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(cells)
    ks = sorted({c["K"] for c in cells}, reverse=True)
    fig, axes = plt.subplots(1, len(ks), figsize=(5.5 * len(ks), 4), squeeze=False)
    for ax, k in zip(axes[0], ks, strict=True):
        ns = sorted({c["n"] for c in cells if c["K"] == k}, key=_n_key)
        for method in methods:
            xs, ys, es = [], [], []
            for i, n in enumerate(ns):
                accs = [c["macro_accuracy"] for c in groups.get((k, n, method), [])]
                if accs:
                    xs.append(i)
                    ys.append(statistics.mean(accs))
                    es.append(statistics.stdev(accs) if len(accs) > 1 else 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
        ax.set_xticks(range(len(ns)), [f"n={n}" for n in ns])
        ax.set_title(f"UKPConvArg1, K = {k} workers")
        ax.set_ylabel("macro test accuracy")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(store: dict, methods: list[str], md: Path, png: Path) -> str:
    cells = list(store["cells"].values())
    text = "\n".join(
        [
            tables(cells, methods),
            worker_table(cells, methods, *HEADLINE),
            timing(cells, methods),
            f"Settings: {json.dumps(store['settings'])}\n",
        ]
    )
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    plot(cells, methods, png)
    return text


if __name__ == "__main__":
    from real_ukp import METHODS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "real_ukp.json"))
    p.add_argument("--methods", default=METHODS)
    args = p.parse_args()
    path = Path(args.json)
    store = json.loads(path.read_text())
    print(report(store, args.methods.split(","), path.with_suffix(".md"), path.with_suffix(".png")))

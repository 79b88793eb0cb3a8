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

from common import grid_table, mean_sd

ROOT = Path(__file__).resolve().parents[1]
HEADLINE = (20, "50")
GRID = {"K": [20, 5], "n": ["25", "50", "100", "all"], "seeds": 3}
ALL_PAIRS = {20: 15594, 5: 7647}  # training pairs at n=all, seed 0
# The methods of the UKP grid (benchmarks/real_ukp.py runs them, this module reports them).
METHODS = ",".join(
    ["shared", "shared+from-shared", "independent", "sharelora", "sharelora-head"]
    + ["sharelora-b", "core", "diag", "sharelora+warmup"]
)


def _n_key(n: str) -> float:
    return float("inf") if n == "all" else int(n)


def _groups(cells: list[dict]) -> dict[tuple, list[dict]]:
    """(K, n, method) -> the cells of every seed run."""
    out = defaultdict(list)
    for c in cells:
        out[(c["K"], c["n"], c["method"])].append(c)
    return out


def _accuracy(runs: list[dict], key: str) -> str:
    return mean_sd([c[key] for c in runs]) if runs else "—"


def _paired(runs: list[dict], base: list[dict]) -> str:
    """Differences of macro accuracy from the baseline's run of the same seed."""
    by_seed = {c["seed"]: c["macro_accuracy"] for c in base}
    diffs = [c["macro_accuracy"] - by_seed[c["seed"]] for c in runs if c["seed"] in by_seed]
    if not diffs:
        return "—"
    sd = f" ± {statistics.stdev(diffs):.3f}" if len(diffs) > 1 else ""
    return f"{statistics.mean(diffs):+.3f}{sd} ({len(diffs)})"


def _strengths(runs: list[dict], method: str) -> str:
    if not runs or method.partition("+")[0] == "shared":
        return "—"
    return ", ".join(f"{c['strength']:g}" for c in sorted(runs, key=lambda c: c["seed"]))


def tables(cells: list[dict], methods: list[str]) -> str:
    groups = _groups(cells)
    lines = []
    for k in sorted({c["K"] for c in cells}, reverse=True):
        ns = sorted({c["n"] for c in cells if c["K"] == k}, key=_n_key)
        for key in ("macro_accuracy", "micro_accuracy"):
            lines += grid_table(
                f"**K = {k} workers, {key.split('_')[0]} test accuracy** "
                "(mean ± sd over seeds; runs in brackets)",
                ns,
                methods,
                lambda n, m, k=k, key=key: _accuracy(groups.get((k, n, m), []), key),
            )
        for base in ("shared", "shared+from-shared"):
            lines += grid_table(
                f"**K = {k}: macro accuracy minus `{base}`, paired by seed** (mean ± sd)",
                ns,
                [m for m in methods if m != base],
                lambda n, m, k=k, base=base: _paired(
                    groups.get((k, n, m), []), groups.get((k, n, base), [])
                ),
            )
        lines += grid_table(
            f"**K = {k}: personalization strength chosen on validation** (per seed)",
            ns,
            methods,
            lambda n, m, k=k: _strengths(groups.get((k, n, m), []), m),
        )
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


def _pooled_slope(cells: list[dict]) -> float:
    """Seconds per training pair, fitted within each K and pooled (the evaluation cost, which
    differs between K, stays in each K's intercept); never negative."""
    num = den = 0.0
    for k in {c["K"] for c in cells}:
        mine = [c for c in cells if c["K"] == k]
        mx = statistics.mean(c["train_pairs"] for c in mine)
        my = statistics.mean(c["seconds"] for c in mine)
        num += sum((c["train_pairs"] - mx) * (c["seconds"] - my) for c in mine)
        den += sum((c["train_pairs"] - mx) ** 2 for c in mine)
    return max(num / den, 0.0) if den else 0.0


def timing(cells: list[dict], methods: list[str]) -> str:
    """Time spent, and the full grid's estimate at the current speed: from the cells run with
    the top block at position 0 only (``first_token``) when there are any, else from all. Each
    (K, n) costs the mean of its timed cells; one with none costs its K's mean plus the pooled
    seconds per training pair times the difference in training pairs; training pairs of n=all
    are the seed-0 split's (``ALL_PAIRS``)."""
    spent = sum(c["seconds"] for c in cells)
    current = [c for c in cells if c.get("first_token")]
    timed = current or cells
    slope, total, fitted, unmeasured = _pooled_slope(timed), 0.0, [], []
    for k in GRID["K"]:
        mine = [c for c in timed if c["K"] == k]
        if not mine:  # nothing to extrapolate from: left out of the estimate, and said so
            unmeasured.append(k)
            continue
        mean_pairs = statistics.mean(c["train_pairs"] for c in mine)
        mean_seconds = statistics.mean(c["seconds"] for c in mine)
        for n in GRID["n"]:
            run = [c["seconds"] for c in mine if c["n"] == n]
            if run:
                per_cell = statistics.mean(run)
            else:
                pairs = ALL_PAIRS[k] if n == "all" else int(n) * k
                per_cell = mean_seconds + slope * (pairs - mean_pairs)
                fitted.append(f"K={k} n={n}: {per_cell / 60:.0f} min")
            total += per_cell * GRID["seeds"] * len(methods)
    grid = len(GRID["K"]) * len(GRID["n"]) * GRID["seeds"] * len(methods)
    return (
        f"Cells run: {len(cells)} of {grid}, taking {spent / 3600:.1f} h (2 CPU cores, often "
        f"shared with other work: an upper bound). The full grid ({len(methods)} methods, K ∈ "
        f"{GRID['K']}, n ∈ {GRID['n']}, {GRID['seeds']} seeds) is estimated at "
        f"{total / 3600:.1f} h on this machine"
        + (
            f", timed from the {len(current)} cells run with the top block at position 0 only"
            if current
            else ""
        )
        + (f" without K = {unmeasured} (no cell run there yet)" if unmeasured else "")
        + f" ({slope * 1000:.0f} s per 1,000 training pairs); "
        f"per method-cell where not measured: {'; '.join(fitted) or 'none'}.\n"
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "real_ukp.json"))
    p.add_argument("--methods", default=METHODS)
    args = p.parse_args()
    path = Path(args.json)
    store = json.loads(path.read_text())
    print(report(store, args.methods.split(","), path.with_suffix(".md"), path.with_suffix(".png")))

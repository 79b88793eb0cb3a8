"""Reports: per-user accuracy tables (markdown) and grouped-bar plots."""

from __future__ import annotations

from pathlib import Path


def _users(results: dict[str, dict]) -> list[str]:
    return sorted({u for m in results.values() for u in m["users"]})


def accuracy_table(results: dict[str, dict]) -> str:
    """Markdown: users as rows, methods as columns, the best value of each row in bold, then
    macro and micro rows. ``results`` maps method -> ``metrics.json`` dict."""
    methods = list(results)
    rows = []
    for user in _users(results):
        cells = {m: results[m]["users"].get(user, {}).get("accuracy") for m in methods}
        n = next(results[m]["users"][user]["n"] for m in methods if user in results[m]["users"])
        rows.append((user, n, cells))
    for key in ("macro_accuracy", "micro_accuracy"):
        label = f"**{key.split('_')[0]}**"
        n = max(results[m].get("n", 0) for m in methods)
        rows.append((label, n, {m: results[m][key] for m in methods}))
    lines = ["| user | n | " + " | ".join(methods) + " |", "|---|---:|" + "---:|" * len(methods)]
    for user, n, cells in rows:
        best = max((v for v in cells.values() if v is not None), default=None)
        shown = [
            "—" if v is None else f"**{v:.3f}**" if v == best and len(methods) > 1 else f"{v:.3f}"
            for v in cells.values()
        ]
        lines.append(f"| {user} | {n} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def plot_accuracy(results: dict[str, dict], path: str | Path, title: str = "") -> None:
    """Grouped bars: per-user test accuracy for each method, and the macro average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = _users(results) + ["macro"]
    methods = list(results)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(users) * len(methods) / 2 + 3), 4))
    for k, method in enumerate(methods):
        values = [results[method]["users"].get(u, {}).get("accuracy", 0) for u in users[:-1]]
        values.append(results[method]["macro_accuracy"])
        xs = [i + (k - (len(methods) - 1) / 2) * width for i in range(len(users))]
        ax.bar(xs, values, width, label=method)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(users)), users, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.legend(ncols=len(methods), loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

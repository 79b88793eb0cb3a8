"""Does personalization pay on this data? The numbers ``compare`` reports beside accuracy.

- **Room for personalization**: how often two users who judged the same pair disagree. Near 0
  (everyone agrees) one reward serves all; 0.5 is no shared taste at all.
- **Gain over the baseline** with a paired bootstrap interval over users: the baseline is the
  stronger of ``shared`` and its compute control (``shared`` trained as long as the personal
  methods), so training length is never counted as personalization.
- **Shuffled-user control**: each user scored with another user's parameters. When accuracy
  does not drop, nothing user-specific was learned.
"""

from __future__ import annotations

import random
import statistics
from collections import Counter, defaultdict

from .data import Comparison
from .evaluate import bootstrap_ci


def disagreement(rows: list[Comparison]) -> dict:
    """``{"rate", "user_pairs"}``: among pairs of distinct users who judged the same
    (prompt, unordered texts), the share whose verdicts differ (``rate`` is ``None`` when no
    two users judged one pair). A user's repeated verdicts on one pair count once (the last)."""
    verdicts: dict[tuple, dict[str, str]] = defaultdict(dict)
    for c in rows:
        verdicts[(c.prompt, frozenset((c.chosen, c.rejected)))][c.user] = c.chosen
    total = disagree = 0
    for by_user in verdicts.values():
        counts = list(Counter(by_user.values()).values())
        n = sum(counts)
        total += n * (n - 1) // 2
        if len(counts) == 2:
            disagree += counts[0] * counts[1]
    return {"rate": disagree / total if total else None, "user_pairs": total}


def paired_gain(metrics: dict, baseline: dict, resamples: int = 2000, seed: int = 0) -> dict:
    """Mean over users of ``accuracy − baseline accuracy`` and its 95% percentile bootstrap
    interval over users (users resampled with replacement, both methods together)."""
    users = sorted(set(metrics["users"]) & set(baseline["users"]))
    diffs = [metrics["users"][u]["accuracy"] - baseline["users"][u]["accuracy"] for u in users]
    if not diffs:
        return {"gain": None, "low": None, "high": None, "users": 0}
    low, high = bootstrap_ci(diffs, seed, resamples)
    return {"gain": statistics.fmean(diffs), "low": low, "high": high, "users": len(users)}


def shuffled_users(rows: list[Comparison], seed: int = 0) -> list[Comparison]:
    """``rows`` with every user's comparisons handed to another user (a seeded derangement:
    no user keeps their own), for the shuffled-user control."""
    from dataclasses import replace

    users = sorted({c.user for c in rows})
    if len(users) < 2:
        raise ValueError("the shuffled-user control needs at least two users")
    order = users[:]
    random.Random(seed).shuffle(order)
    other = {u: order[(i + 1) % len(order)] for i, u in enumerate(order)}  # a cycle: no fixed point
    return [replace(c, user=other[c.user]) for c in rows]


def baseline_of(results: dict[str, dict]) -> str | None:
    """The stronger (macro test accuracy) of ``shared`` and its control ``shared+from-shared``."""
    names = [m for m in ("shared", "shared+from-shared") if m in results]
    return max(names, key=lambda m: results[m]["macro_accuracy"]) if names else None


def diagnostics_text(diag: dict) -> str:
    """Markdown lines for ``compare``'s report."""
    room = diag["room"]
    lines = ["## Does personalization pay here?", ""]
    if room["rate"] is None:
        lines.append("Room for personalization: no two users judged the same pair.")
    else:
        lines.append(
            f"Room for personalization: two users who judged the same pair disagree "
            f"{room['rate']:.0%} of the time ({room['user_pairs']:,} user pairs; 0% = "
            "everyone agrees, 50% = no shared taste)."
        )
    base = diag["baseline"]
    if base is None:
        return "\n".join(lines)
    lines += [
        "",
        f"Gains are against `{base}` (the stronger of `shared` and its compute control), "
        "mean over users with a 95% paired bootstrap interval. The shuffled-user control "
        "scores each user with another user's parameters: a method that learned something "
        "user-specific loses accuracy there.",
        "",
        "| method | macro accuracy | gain | 95% interval | shuffled users | drop |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for method, d in diag["methods"].items():
        g = d["gain"]
        gain = "—" if g["gain"] is None else f"{g['gain']:+.3f}"
        interval = "—" if g["gain"] is None else f"[{g['low']:+.3f}, {g['high']:+.3f}]"
        shuffled = d.get("shuffled_macro_accuracy")
        sh = "—" if shuffled is None else f"{shuffled:.3f}"
        drop = "—" if shuffled is None else f"{d['macro_accuracy'] - shuffled:+.3f}"
        lines.append(
            f"| {method} | {d['macro_accuracy']:.3f} | {gain} | {interval} | {sh} | {drop} |"
        )
    kept = [m for m, d in diag["methods"].items() if d.get("served") == "population"]
    if kept:
        lines += [
            "",
            f"{', '.join(f'`{m}`' for m in kept)}: personalization does not pay on this data "
            "(validation could not tell the personal model from the population): serving the "
            "population.",
        ]
    return "\n".join(lines)

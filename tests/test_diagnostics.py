"""compare's diagnostics: room for personalization, paired gains, the shuffled-user control."""

from __future__ import annotations

import pytest

from sharelora.data import Comparison
from sharelora.diagnostics import (
    baseline_of,
    diagnostics_text,
    disagreement,
    paired_gain,
    shuffled_users,
)


def _metrics(accuracies: dict[str, float]) -> dict:
    users = {u: {"accuracy": a, "n": 10} for u, a in accuracies.items()}
    return {"users": users, "macro_accuracy": sum(accuracies.values()) / len(accuracies)}


def test_disagreement_counts_user_pairs_on_the_same_item():
    rows = [
        Comparison("q", "a", "b", "u1"),
        Comparison("q", "a", "b", "u2"),
        Comparison("q", "b", "a", "u3"),  # the same unordered pair, the other verdict
        Comparison("q", "c", "d", "u1"),  # judged by one user only: no pair
        Comparison("p", "a", "b", "u4"),  # another prompt: another item
    ]
    # Item (q, {a, b}): users u1, u2 say a, u3 says b -> 3 user pairs, 2 disagree.
    assert disagreement(rows) == {"rate": pytest.approx(2 / 3), "user_pairs": 3}
    assert disagreement(rows[3:]) == {"rate": None, "user_pairs": 0}


def test_paired_gain_and_its_interval():
    base = _metrics({f"u{i}": 0.6 for i in range(20)})
    same = paired_gain(base, base)
    assert same == {"gain": 0.0, "low": 0.0, "high": 0.0, "users": 20}
    better = _metrics({f"u{i}": 0.6 + (0.2 if i % 2 else 0.0) for i in range(20)})
    got = paired_gain(better, base, seed=1)
    assert got["gain"] == pytest.approx(0.1)
    assert 0.0 < got["low"] < 0.1 < got["high"] < 0.2
    assert paired_gain(better, base, seed=1) == got  # seeded


def test_shuffled_users_gives_every_user_another_users_rows():
    rows = [Comparison("q", f"a{i}", f"b{i}", f"u{i % 5}") for i in range(20)]
    shuffled = shuffled_users(rows, seed=3)
    mapping = {r.user: s.user for r, s in zip(rows, shuffled, strict=True)}
    assert sorted(mapping.values()) == sorted(mapping)  # a bijection over the users
    assert all(u != v for u, v in mapping.items())  # nobody keeps their own parameters
    assert [s.chosen for s in shuffled] == [r.chosen for r in rows]
    with pytest.raises(ValueError, match="at least two users"):
        shuffled_users(rows[:1])


def test_baseline_is_the_stronger_of_shared_and_its_control():
    results = {
        "shared": {"macro_accuracy": 0.63},
        "shared+from-shared": {"macro_accuracy": 0.70},
        "sharelora": {"macro_accuracy": 0.69},
    }
    assert baseline_of(results) == "shared+from-shared"
    assert baseline_of({"sharelora": {"macro_accuracy": 0.5}}) is None
    text = diagnostics_text(
        {
            "room": {"rate": 0.43, "user_pairs": 1000},
            "baseline": "shared",
            "methods": {
                "sharelora": {
                    "macro_accuracy": 0.7,
                    "gain": {"gain": 0.05, "low": 0.01, "high": 0.09, "users": 3},
                    "shuffled_macro_accuracy": 0.6,
                }
            },
        }
    )
    assert "disagree 43% of the time" in text
    assert "| sharelora | 0.700 | +0.050 | [+0.010, +0.090] | 0.600 | +0.100 |" in text

"""Per-user train/validation/test splits, user selection and the audit manifest."""

from __future__ import annotations

import collections
import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .records import Comparison, DataError


@dataclass
class SplitConfig:
    """How comparisons are selected and split (seeded, deterministic).

    Attributes:
        val, test: fractions of each user's comparisons (train gets the rest).
        seed: drives every shuffle.
        top_users: keep the K users with the most comparisons (ties broken by name).
        min_per_user: drop users with fewer comparisons than this.
        max_per_user: cap each user's *training* comparisons at the first n after a seeded
            shuffle: the per-user sample size of the paper's theory.
        holdout_users: keep K whole users (drawn with the seed) out of training, for onboarding.
    """

    val: float = 0.1
    test: float = 0.2
    seed: int = 0
    top_users: int | None = None
    min_per_user: int = 1
    max_per_user: int | None = None
    holdout_users: int = 0

    def __post_init__(self):
        for name in ("val", "test"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name} fraction must be in [0, 1), got {value!r}")
        if self.val + self.test >= 1:
            raise ValueError(f"val + test must leave data to train on, got {self.val + self.test}")
        for name in ("top_users", "max_per_user"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not isinstance(self.min_per_user, int) or self.min_per_user < 1:
            raise ValueError(f"min_per_user must be a positive integer, got {self.min_per_user!r}")
        if not isinstance(self.holdout_users, int) or self.holdout_users < 0:
            raise ValueError(f"holdout_users must be >= 0, got {self.holdout_users!r}")


@dataclass
class Splits:
    train: list[Comparison]
    val: list[Comparison]
    test: list[Comparison]
    holdout: list[Comparison] = field(default_factory=list)  # every row of the held-out users
    manifest: dict = field(default_factory=dict)

    @property
    def users(self) -> list[str]:
        """Training users, in first-appearance order of the training rows."""
        return list(dict.fromkeys(c.user for c in self.train))

    def write_manifest(self, path: str | Path) -> None:
        from ..files import write_json

        write_json(path, self.manifest)


def _bucket(seed: int, key: str) -> float:
    """A stable uniform draw in [0, 1) for ``key`` (same group -> same split everywhere)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _fingerprint(rows: list[Comparison]) -> str:
    h = hashlib.sha256()
    for c in rows:
        h.update(json.dumps([c.user, c.prompt, c.chosen, c.rejected, c.group]).encode())
    return h.hexdigest()


def _split_user(rows: list[Comparison], cfg: SplitConfig, user: str) -> dict[str, list]:
    """One user's rows by part. A split column (``Comparison.split``) fixes the test rows, and
    validation is then ``cfg.val`` of the rest; a group column assigns whole groups."""
    mine: dict[str, list] = {"train": [], "val": [], "test": []}
    test_share = cfg.test
    if any(c.split is not None for c in rows):
        mine["test"] = [c for c in rows if c.split == "test"]
        rows, test_share = [c for c in rows if c.split != "test"], 0.0
    if any(c.group is not None for c in rows):
        for c in rows:
            x = _bucket(cfg.seed, c.group)
            part = "test" if x < test_share else "val" if x < test_share + cfg.val else "train"
            mine[part].append(c)
        random.Random(f"{cfg.seed}:{user}").shuffle(mine["train"])
        return mine
    rows = list(rows)
    random.Random(f"{cfg.seed}:{user}").shuffle(rows)
    n_test, n_val = round(len(rows) * test_share), round(len(rows) * cfg.val)
    mine["test"] += rows[:n_test]
    mine["val"], mine["train"] = rows[n_test : n_test + n_val], rows[n_test + n_val :]
    return mine


def split_per_user(data: list[Comparison], config: SplitConfig | None = None) -> Splits:
    """Select users and split each user's comparisons into train/val/test.

    With a group column (``Comparison.group``) every group goes to one split for all users, by a
    seeded hash, so one item never sits in two splits. With a split column
    (``Comparison.split``, ``--split-col``) the data's own ``test`` rows are the test split and
    ``val`` is carved from the rest (by group when there is one). Without either, each user's
    rows are shuffled and cut at the fractions. A user left with no training row (every one of
    their groups drawn into val/test) is dropped from all splits and listed in the manifest
    under ``dropped_without_training_rows``.
    """
    cfg = config or SplitConfig()
    by_user: dict[str, list[Comparison]] = collections.defaultdict(list)
    for c in data:
        by_user[c.user].append(c)
    users = [u for u in by_user if len(by_user[u]) >= cfg.min_per_user]
    if cfg.top_users is not None:
        users = sorted(users, key=lambda u: (-len(by_user[u]), u))[: cfg.top_users]
    if not users:
        raise DataError(f"no user has at least {cfg.min_per_user} comparisons (--min-per-user)")
    if cfg.holdout_users >= len(users):
        raise DataError(
            f"--holdout-users {cfg.holdout_users} leaves no user to train on ({len(users)} "
            "users have enough data)"
        )
    rng = random.Random(cfg.seed)
    holdout = sorted(rng.sample(sorted(users), cfg.holdout_users)) if cfg.holdout_users else []
    parts: dict[str, list[Comparison]] = {"train": [], "val": [], "test": []}
    counts, untrained = {}, {}
    for user in users:
        if user in holdout:
            continue
        mine = _split_user(by_user[user], cfg, user)
        if cfg.max_per_user is not None:
            mine["train"] = mine["train"][: cfg.max_per_user]
        if not mine["train"]:
            # Every group of this user fell in val/test: a model cannot score a user it never
            # trained, so the user is dropped (and counted) rather than failing evaluation.
            untrained[user] = {part: len(rows_) for part, rows_ in mine.items()}
            continue
        for part, rows_ in mine.items():
            parts[part].extend(rows_)
        counts[user] = {part: len(rows_) for part, rows_ in mine.items()}
    held = [c for u in holdout for c in by_user[u]]
    manifest = {
        "config": asdict(cfg),
        "users": counts,
        "holdout_users": {u: len(by_user[u]) for u in holdout},
        "dropped_without_training_rows": untrained,
        "sizes": {part: len(rows) for part, rows in parts.items()} | {"holdout": len(held)},
        "sha256": {part: _fingerprint(rows) for part, rows in parts.items()}
        | {"holdout": _fingerprint(held)},
    }
    if not counts:
        raise DataError(
            f"no user has a training comparison after the split ({len(untrained)} users had "
            "all their groups in val/test); lower --val/--test or check --group-col"
        )
    return Splits(parts["train"], parts["val"], parts["test"], held, manifest)

"""Per-user train/validation/test splits, user selection and the audit manifest."""

from __future__ import annotations

import collections
import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import SplitConfig
from .records import Comparison, DataError


@dataclass
class Splits:
    train: list[Comparison]
    val: list[Comparison]
    test: list[Comparison]
    holdout: list[Comparison] = field(default_factory=list)  # every row of the held-out users
    manifest: dict = field(default_factory=dict)
    # Every non-test row of the trained users (train, val and the pairs a text carve left out,
    # capped at max_per_user): what the choices made on validation are refit on.
    refit: list[Comparison] = field(default_factory=list)

    @property
    def users(self) -> list[str]:
        """Training users, in first-appearance order of the training rows (then of the refit
        rows: a user whose every text a text carve held out still trains in the refit)."""
        return list(dict.fromkeys(c.user for c in self.train + self.refit))

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


def pair_texts(c: Comparison) -> tuple[str, str]:
    """The pair's two texts, each with its prompt: what a text carve holds out."""
    return (f"{c.prompt}\x1f{c.chosen}", f"{c.prompt}\x1f{c.rejected}")


def resolve_val_by(rows: list[Comparison], cfg: SplitConfig) -> str:
    """``cfg.val_by`` with ``auto`` resolved for these rows."""
    grouped = any(c.group is not None for c in rows)
    if cfg.val_by == "group" and not grouped:
        raise DataError("--val-by group needs a group column (--group-col)")
    if cfg.val_by != "auto":
        return cfg.val_by
    if grouped and not any(c.split is not None for c in rows):
        return "group"
    return "text"


def _split_user(rows: list[Comparison], cfg: SplitConfig, user: str, val_by: str) -> dict:
    """One user's rows by part. A split column (``Comparison.split``) fixes the test rows, a
    group column sends whole groups to test, else test rows are drawn at random; validation
    then comes from the rest by ``val_by``."""
    mine: dict[str, list] = {"train": [], "val": [], "test": []}
    rng = random.Random(f"{cfg.seed}:{user}")
    n_val = None  # for val_by row
    if any(c.split is not None for c in rows):
        mine["test"] = [c for c in rows if c.split == "test"]
        rest, val_from = [c for c in rows if c.split != "test"], 0.0
    elif any(c.group is not None for c in rows):
        mine["test"] = [c for c in rows if _bucket(cfg.seed, c.group) < cfg.test]
        rest, val_from = [c for c in rows if _bucket(cfg.seed, c.group) >= cfg.test], cfg.test
    else:
        rest = list(rows)
        rng.shuffle(rest)
        n_test, n_val = round(len(rest) * cfg.test), round(len(rest) * cfg.val)
        mine["test"], rest = rest[:n_test], rest[n_test:]
    if val_by == "row":
        if n_val is None:
            rng.shuffle(rest)
            n_val = round(len(rest) * cfg.val)
        mine["val"], mine["train"] = rest[:n_val], rest[n_val:]
        return mine
    # Under "text" each text is held out with probability sqrt(val), so that about `val` of the
    # pairs hold two held-out texts. A pair of one held-out and one training text is neither:
    # the model would know the user's verdict on one side, which a new-text test never shows.
    p_text = cfg.val**0.5
    for c in rest:
        if val_by == "group":
            part = "val" if _bucket(cfg.seed, c.group) < val_from + cfg.val else "train"
        else:
            held = [_bucket(cfg.seed, t) < p_text for t in pair_texts(c)]
            part = "val" if all(held) else "dropped" if any(held) else "train"
        mine.setdefault(part, []).append(c)
    rng.shuffle(mine["train"])
    return mine


def seen_share(rows: list[Comparison], train: list[Comparison]) -> float | None:
    """The share of ``rows`` whose texts (prompt + response, both sides) all appear in
    ``train``: high for a validation or test set over known texts, low for new ones."""
    if not rows:
        return None
    seen = {t for c in train for t in pair_texts(c)}
    return sum(all(t in seen for t in pair_texts(c)) for c in rows) / len(rows)


def validation_warning(splits: Splits) -> str | None:
    """A warning when validation pairs are mostly over texts seen in training while the test's
    are not known to be: a strength chosen on such validation suits seen texts, and is
    optimistic for new ones."""
    val = seen_share(splits.val, splits.train)
    test = seen_share(splits.test, splits.train)
    if val is None or val <= 0.5 or (test is not None and test > 0.5):
        return None
    where = "the test pairs mostly hold new texts" if test is not None else "there is no test"
    return (
        f"{val:.0%} of validation pairs hold only texts seen in training, but {where}: the "
        "strength chosen on it suits known texts and is optimistic for new ones. If the model "
        "will score new texts, carve validation by text (--val-by text)"
    )


def split_per_user(data: list[Comparison], config: SplitConfig | None = None) -> Splits:
    """Select users and split each user's comparisons into train/val/test.

    With a group column (``Comparison.group``) every group goes to one split for all users, by a
    seeded hash, so one item never sits in two splits. With a split column
    (``Comparison.split``, ``--split-col``) the data's own ``test`` rows are the test split and
    ``val`` is carved from the rest (by group when there is one). Without either, each user's
    rows are shuffled and cut at the fractions. A user left with no row outside the test (every
    one of their groups drawn into test) is dropped from all splits and listed in the manifest
    under ``dropped_without_training_rows``. Under ``val_by="text"`` the pairs that join a
    held-out and a training text are in neither train nor val (counted in ``sizes``); like every
    non-test row they are in ``refit``, what training refits on once validation has chosen.
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
    counts, untrained, dropped, refit = {}, {}, 0, []
    val_by = resolve_val_by([c for u in users for c in by_user[u]], cfg)
    for user in users:
        if user in holdout:
            continue
        mine = _split_user(by_user[user], cfg, user, val_by)
        between = mine.pop("dropped", [])
        dropped += len(between)
        everything = mine["train"] + mine["val"] + between
        if cfg.max_per_user is not None:
            mine["train"] = mine["train"][: cfg.max_per_user]
            everything = everything[: cfg.max_per_user]
        if not everything:
            # Every group of this user fell in test: a model cannot score a user it never
            # trained, so the user is dropped (and counted) rather than failing evaluation.
            untrained[user] = {part: len(rows_) for part, rows_ in mine.items()}
            continue
        for part, rows_ in mine.items():
            parts[part].extend(rows_)
        refit.extend(everything)
        counts[user] = {part: len(rows_) for part, rows_ in mine.items()}
    held = [c for u in holdout for c in by_user[u]]
    manifest = {
        "config": asdict(cfg),
        "val_by": val_by,
        "validation_pairs_with_seen_texts": seen_share(parts["val"], parts["train"]),
        "users": counts,
        "holdout_users": {u: len(by_user[u]) for u in holdout},
        "dropped_without_training_rows": untrained,
        "sizes": {part: len(rows) for part, rows in parts.items()}
        | {"holdout": len(held), "dropped_between_train_and_val": dropped},
        "sha256": {part: _fingerprint(rows) for part, rows in parts.items()}
        | {"holdout": _fingerprint(held)},
    }
    if not counts:
        raise DataError(
            f"no user has a training comparison after the split ({len(untrained)} users had "
            "all their groups in val/test); lower --val/--test or check --group-col"
        )
    return Splits(parts["train"], parts["val"], parts["test"], held, manifest, refit)

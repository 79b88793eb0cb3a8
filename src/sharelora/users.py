"""The user vocabulary: external user names <-> contiguous ids into the per-user tables."""

from __future__ import annotations

import json
import numbers
from collections.abc import Iterable
from pathlib import Path

import torch


def normalize_user(name: object) -> str:
    """Canonical form of a user value: ``1``, ``"1"`` and ``" 1 "`` are the same user.

    Data files disagree on types (a CSV gives ``"1"``, a JSONL ``1``), so every user value is
    keyed by its stripped string form. Floats that are whole numbers (pandas turns an int column
    with gaps into floats) map to the int form, so ``1.0`` is user ``"1"`` too.
    """
    if isinstance(name, bool) or name is None:
        raise ValueError(f"user must be a string or an integer, got {name!r}")
    if isinstance(name, numbers.Integral):  # NumPy and torch integers too
        name = int(name)
    elif isinstance(name, numbers.Real):
        if not float(name).is_integer():
            raise ValueError(f"user must be a string or an integer, got {name!r}")
        name = int(name)
    if not isinstance(name, (str, int)):
        raise ValueError(f"user must be a string or an integer, got {type(name).__name__} {name!r}")
    text = str(name).strip()
    if not text:
        raise ValueError("user must be a non-empty string")
    return text


class UnknownUserError(KeyError):
    """A user name the model does not know."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown user"


class UserVocab:
    """An ordered, append-only map from user names to ids ``0..N-1``.

    Ids index the stacked per-user tables of every adapter layer, so the order must never change
    once a model is trained: new users (onboarding) are appended at the end.
    """

    def __init__(self, names: Iterable[object] = ()):
        self._names: list[str] = []
        self._ids: dict[str, int] = {}
        self.add(names)

    def add(self, names: Iterable[object]) -> list[int]:
        """Append the names not yet known; returns the ids of all ``names`` in order."""
        ids = []
        for name in names:
            key = normalize_user(name)
            if key not in self._ids:
                self._ids[key] = len(self._names)
                self._names.append(key)
            ids.append(self._ids[key])
        return ids

    def truncate(self, n: int) -> None:
        """Forget every user from id ``n`` on (the last ones added)."""
        for name in self._names[n:]:
            del self._ids[name]
        del self._names[n:]

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        try:
            return normalize_user(name) in self._ids
        except ValueError:
            return False

    def __iter__(self):
        return iter(self._names)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UserVocab) and self._names == other._names

    def __repr__(self) -> str:
        shown = ", ".join(self._names[:5]) + (", ..." if len(self) > 5 else "")
        return f"UserVocab({len(self)} users: {shown})"

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def id(self, name: object) -> int:
        key = normalize_user(name)
        if key not in self._ids:
            shown = ", ".join(self._names[:10]) + (" ..." if len(self) > 10 else "")
            raise UnknownUserError(
                f"unknown user {key!r}; this model knows {len(self)} users: {shown}"
            )
        return self._ids[key]

    def encode(self, names: Iterable[object]) -> torch.Tensor:
        """Names -> LongTensor ``[len(names)]`` of ids. Unknown names raise ``KeyError``."""
        return torch.tensor([self.id(n) for n in names], dtype=torch.long)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> list[str]:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return [self._names[i] for i in ids]

    def save(self, path: str | Path) -> None:
        from .files import write_json

        write_json(path, {"users": self._names})

    @classmethod
    def load(cls, path: str | Path) -> UserVocab:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read the user list ({err})") from err
        if not isinstance(data, dict) or not isinstance(data.get("users"), list):
            raise ValueError(f"{path}: expected a JSON object with a 'users' list")
        vocab = cls(data["users"])
        if len(vocab) != len(data["users"]):
            raise ValueError(f"{path}: the user list has duplicates")
        return vocab

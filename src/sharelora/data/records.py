"""The records every data module shares: one comparison, the columns that hold it, and the
error for bad input data."""

from __future__ import annotations

from dataclasses import dataclass


class DataError(ValueError):
    """Bad input data; the message names the source, the row and the column."""


@dataclass
class Columns:
    """Which source columns hold each field. ``prompt`` is optional; ``group`` keeps all
    judgements of one item (e.g. ``pair_id``) in the same split."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    user: str = "user"
    group: str | None = None
    split: str | None = None  # a column fixing each row's split (``train``/``test``), if any


@dataclass
class Comparison:
    """One judgement: ``user`` preferred ``chosen`` over ``rejected`` as a reply to ``prompt``.

    Each text is plain text or a list of chat messages (``sharelora.render``)."""

    prompt: str | list
    chosen: str | list
    rejected: str | list
    user: str
    group: str | None = None
    split: str | None = None  # "train" or "test" when the data fixes the split
    row: int = 0  # the source's line (JSONL) or row number (others), 1-based, for messages

"""Preference data: reading, validation, per-user splits, builders and batching."""

from .collate import PairDataset, PairTokenizer
from .read import ReadReport, read_preferences
from .records import Columns, Comparison, DataError
from .split import (
    SplitConfig,
    Splits,
    pair_texts,
    seen_share,
    split_per_user,
    validation_warning,
)

__all__ = [
    "Columns",
    "Comparison",
    "DataError",
    "PairDataset",
    "PairTokenizer",
    "ReadReport",
    "SplitConfig",
    "Splits",
    "pair_texts",
    "read_preferences",
    "seen_share",
    "split_per_user",
    "validation_warning",
]

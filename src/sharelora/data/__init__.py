"""Preference data: reading, validation, per-user splits, builders and batching."""

from .collate import PairDataset, PairTokenizer
from .read import ReadReport, read_preferences
from .records import Columns, Comparison, DataError
from .split import SplitConfig, Splits, split_per_user

__all__ = [
    "Columns",
    "Comparison",
    "DataError",
    "PairDataset",
    "PairTokenizer",
    "ReadReport",
    "SplitConfig",
    "Splits",
    "read_preferences",
    "split_per_user",
]

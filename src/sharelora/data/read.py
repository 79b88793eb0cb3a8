"""Reading and validating preference data: JSONL, CSV, Parquet, Hugging Face datasets, builtin."""

from __future__ import annotations

import collections
import csv
import gzip
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..render import check_messages
from ..users import normalize_user
from .records import Columns, Comparison, DataError

ON_BAD_ROWS = ("error", "skip")
SPLIT_VALUES = ("train", "test")  # what a --split-col column may hold
_SHOWN_ERRORS = 3


@dataclass
class ReadReport:
    """What reading dropped (``--on-bad-rows skip``): counts per reason, never silent."""

    source: str
    rows: int = 0
    kept: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.source}: {self.kept} comparisons"
        reasons = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
        return f"{self.source}: kept {self.kept} of {self.rows} rows; skipped {reasons}"


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict | str]]:
    """Yield ``(line number, object)``, or ``(line, error text)`` for a malformed line."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="strict") as f:
        try:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    yield number, f"malformed JSON ({err.msg})"
                    continue
                yield number, obj if isinstance(obj, dict) else "not a JSON object"
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err


def _load_table(source: str, split: str):
    """A ``datasets.Dataset`` for CSV, Parquet or ``hf:NAME[:CONFIG]``."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if source.startswith("hf:"):
            name, _, config = source[3:].partition(":")
            return datasets.load_dataset(name, config or None, split=split)
        if source.endswith(".csv"):
            # Every CSV cell is text: a response "42" must stay "42", an empty cell "".
            with open(source, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
            features = datasets.Features({name: datasets.Value("string") for name in header})
            return datasets.load_dataset(
                "csv", data_files=source, split="train", features=features, keep_default_na=False
            )
        return datasets.load_dataset("parquet", data_files=source, split="train")
    except Exception as err:  # datasets raises many types; all mean "cannot read this source"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"{source}: cannot read ({first})") from err


def _kind(source: str) -> str:
    if source.startswith("hf:"):
        return "hf"
    if source.startswith("builtin:"):
        return "builtin"
    name = source.lower()
    for ext, kind in (
        (".jsonl", "jsonl"),
        (".jsonl.gz", "jsonl"),
        (".json", "jsonl"),
        (".csv", "csv"),
        (".parquet", "parquet"),
    ):
        if name.endswith(ext):
            return kind
    raise DataError(
        f"{source}: unknown data format; use .jsonl, .jsonl.gz, .csv, .parquet, "
        "hf:NAME[:CONFIG] or builtin:demo"
    )


def _check_row(obj: dict, cols: Columns) -> tuple[Comparison | None, str | None, str | None]:
    """``(comparison, None, None)`` or ``(None, column, reason)``."""
    texts = {}
    for key in ("prompt", "chosen", "rejected"):
        col = getattr(cols, key)
        value = obj.get(col)
        if key == "prompt" and value is None:
            texts[key] = ""
            continue
        if col not in obj or value is None:
            return None, col, "missing"
        if isinstance(value, list):  # conversational: a list of {"role", "content"} messages
            problem = check_messages(value)
            if problem:
                return None, col, problem
        elif not isinstance(value, str):
            return None, col, f"not text or messages ({type(value).__name__})"
        elif key != "prompt" and not value.strip():
            return None, col, "empty"
        texts[key] = value
    if texts["chosen"] == texts["rejected"]:
        return None, cols.chosen, "chosen identical to rejected"
    if cols.user not in obj or obj[cols.user] is None:
        return None, cols.user, "missing"
    try:
        user = normalize_user(obj[cols.user])
    except ValueError:
        return None, cols.user, f"not a user name ({obj[cols.user]!r:.40})"
    group = split = None
    if cols.group is not None:
        if obj.get(cols.group) is None:
            return None, cols.group, "missing"
        group = str(obj[cols.group])
    if cols.split is not None:
        split = obj.get(cols.split)
        if split not in SPLIT_VALUES:
            return None, cols.split, f"not one of {', '.join(SPLIT_VALUES)} ({split!r:.20})"
    comparison = Comparison(texts["prompt"], texts["chosen"], texts["rejected"], user, group, split)
    return comparison, None, None


def read_preferences(
    source: str | os.PathLike,
    columns: Columns | None = None,
    on_bad_rows: str = "error",
    split: str = "train",
) -> tuple[list[Comparison], ReadReport]:
    """Read and validate comparisons from ``source``.

    Args:
        source: a ``.jsonl``/``.jsonl.gz``/``.csv``/``.parquet`` path (``str`` or
            ``os.PathLike``), ``hf:NAME[:CONFIG]`` (a
            hub id or a local directory in the hub's layout), or ``builtin:demo``.
        columns: source column names.
        on_bad_rows: ``"error"`` raises ``DataError`` naming every bad row (up to a few, then a
            count); ``"skip"`` drops them and counts each reason in the report.
        split: the split of an ``hf:`` dataset.
    """
    cols, source = columns or Columns(), os.fspath(source)
    if on_bad_rows not in ON_BAD_ROWS:
        raise ValueError(f"on_bad_rows must be one of {ON_BAD_ROWS}, got {on_bad_rows!r}")
    kind = _kind(source)
    if kind == "builtin":
        from .demo import builtin

        data = builtin(source)
        return data, ReadReport(source, len(data), len(data))
    where = "line" if kind == "jsonl" else "row"
    if kind == "jsonl":
        path = Path(source)
        if not path.is_file():
            raise DataError(f"{source}: file not found")
        rows: Iterable = jsonl_rows(path)
        available = None
    else:
        if kind != "hf" and not Path(source).is_file():
            raise DataError(f"{source}: file not found")
        if kind != "hf" and Path(source).stat().st_size == 0:
            raise DataError(f"{source}: no rows (the file is empty)")
        table = _load_table(source, split)
        available = list(table.column_names)
        rows = enumerate(table, start=1)
    if available is not None:
        _require_columns(source, cols, available)

    report = ReadReport(source)
    kept, errors, seen_columns = [], [], set()
    for number, obj in rows:
        report.rows += 1
        if isinstance(obj, str):
            comparison, col, reason = None, None, obj
        else:
            seen_columns.update(obj)
            comparison, col, reason = _check_row(obj, cols)
        if comparison is None:
            report.skipped[reason] += 1
            at = f"{where} {number}" + (f" column {col!r}" if col else "")
            errors.append(f"{at}: {reason}")
            continue
        comparison.row = number
        kept.append(comparison)
    report.kept = len(kept)
    if report.rows == 0:
        raise DataError(f"{source}: no rows (the file is empty)")
    if available is None and not kept:
        _require_columns(source, cols, sorted(seen_columns))
    if errors and on_bad_rows == "error":
        shown = "; ".join(errors[:_SHOWN_ERRORS])
        more = f" (and {len(errors) - _SHOWN_ERRORS} more)" if len(errors) > _SHOWN_ERRORS else ""
        raise DataError(
            f"{source}: {len(errors)} bad row(s): {shown}{more}; fix them or pass "
            "--on-bad-rows skip to drop them"
        )
    if not kept:
        raise DataError(f"{source}: no valid comparisons ({report.summary()})")
    return kept, report


def _require_columns(source: str, cols: Columns, available: list[str]) -> None:
    needed = [cols.chosen, cols.rejected, cols.user]
    needed += [c for c in (cols.group, cols.split) if c]
    missing = [c for c in needed if c not in available]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {', '.join(repr(c) for c in missing)}; the columns "
            f"are: {', '.join(available) or '(none)'}; name yours with --chosen-col, "
            "--rejected-col, --user-col"
        )

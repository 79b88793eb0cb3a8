"""Hostile input: every random file ends in data or in a DataError naming the row and column;
never another exception, never a silent drop."""

from __future__ import annotations

import csv
import json
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sharelora.cli import main
from sharelora.data import DataError, read_preferences

FIELDS = ["prompt", "chosen", "rejected", "user", "extra"]
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)
values = st.one_of(
    text,
    st.sampled_from(["", " ", "same", "\u202e\u0000", "😀" * 3]),
    st.integers(),
    st.floats(allow_nan=True),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.just("x" * 100_000),
)
rows = st.dictionaries(st.sampled_from(FIELDS), values, max_size=5)
lines = st.lists(st.one_of(rows.map(json.dumps), text.filter(lambda t: "\n" not in t)), max_size=8)
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _check(source: str, path: str, on_bad_rows: str) -> None:
    try:
        data, report = read_preferences(source, on_bad_rows=on_bad_rows)
    except DataError as err:
        message = str(err)
        assert path in message and "\n" not in message
        if "bad row" in message:
            assert re.search(r"(line|row) \d+", message)
        return
    assert report.kept == len(data) and report.kept + sum(report.skipped.values()) == report.rows
    for c in data:
        assert isinstance(c.chosen, str) and c.chosen.strip() and c.chosen != c.rejected
        assert isinstance(c.user, str) and c.user


@FUZZ
@given(lines=lines, on_bad_rows=st.sampled_from(["error", "skip"]))
def test_fuzz_jsonl(tmp_path_factory, lines, on_bad_rows):
    path = tmp_path_factory.mktemp("fuzz") / "d.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    _check(str(path), str(path), on_bad_rows)


cells = st.one_of(text, st.sampled_from(["", "1", "1.0", "same", "x" * 100_000]))


@FUZZ
@given(
    header=st.lists(st.sampled_from(FIELDS), min_size=0, max_size=5, unique=True),
    body=st.lists(st.lists(cells, min_size=5, max_size=5), max_size=6),
    on_bad_rows=st.sampled_from(["error", "skip"]),
)
def test_fuzz_csv(tmp_path_factory, header, body, on_bad_rows):
    path = tmp_path_factory.mktemp("fuzz") / "d.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
            writer.writerows(row[: len(header)] for row in body)
    _check(str(path), str(path), on_bad_rows)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(lines=lines, flag=st.sampled_from([[], ["--on-bad-rows", "skip"], ["--user-col", "😀"]]))
def test_fuzz_cli_eval(tmp_path_factory, lines, flag, capsys):
    d = tmp_path_factory.mktemp("fuzz")
    (d / "d.jsonl").write_text("\n".join(lines), encoding="utf-8")
    code = main(["eval", "--model", str(d / "no-model"), "--data", str(d / "d.jsonl"), *flag])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("sharelora: error:") and "Traceback" not in err
    assert err.count("sharelora: error:") == 1

"""Readers, validation messages, per-user splits, builders, demo data and batching."""

from __future__ import annotations

import gzip
import json
from dataclasses import replace
from pathlib import Path

import datasets
import pytest
import torch

from sharelora import DEFAULT_BACKBONE, UserVocab
from sharelora.backbone import resolve_backbone
from sharelora.data import (
    Columns,
    Comparison,
    DataError,
    PairDataset,
    PairTokenizer,
    SplitConfig,
    read_preferences,
    split_per_user,
    validation_warning,
)
from sharelora.data.builders import (
    build_helpsteer2,
    build_tldr,
    helpsteer2_rows,
    tldr_rows,
    validation_path,
)
from sharelora.data.builders import write_jsonl as write_rows
from sharelora.data.demo import ceiling_accuracy, generate

GOOD = [
    {"prompt": "Q1", "chosen": "yes", "rejected": "no", "user": "ann"},
    {"prompt": "Q2", "chosen": "a", "rejected": "b", "user": 1},
    {"chosen": "c", "rejected": "d", "user": "1"},
]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "csv", "parquet", "hf"])
def test_every_format_reads_the_same(tmp_path, fmt):
    rows = [{**r, "prompt": r.get("prompt", "")} for r in GOOD]
    table = datasets.Dataset.from_list([{**r, "user": str(r["user"])} for r in rows])
    if fmt == "jsonl":
        src = write_jsonl(tmp_path / "d.jsonl", GOOD)
    elif fmt == "jsonl.gz":
        src = str(tmp_path / "d.jsonl.gz")
        with gzip.open(src, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in GOOD)
    elif fmt == "csv":
        src = str(tmp_path / "d.csv")
        table.to_csv(src, index=False)
    elif fmt == "parquet":
        src = str(tmp_path / "d.parquet")
        table.to_parquet(src)
    else:  # a local directory in the hub's layout, read through the hf: path
        (tmp_path / "hub" / "data").mkdir(parents=True)
        table.to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
        src = f"hf:{tmp_path / 'hub'}"
    data, report = read_preferences(src if fmt == "hf" else Path(src))  # a path or a str
    assert [(c.prompt, c.chosen, c.rejected, c.user) for c in data] == [
        ("Q1", "yes", "no", "ann"),
        ("Q2", "a", "b", "1"),
        ("", "c", "d", "1"),
    ]
    assert report.kept == 3 and not report.skipped
    # 1 and "1" are the same user
    assert UserVocab(c.user for c in data).names == ["ann", "1"]


BAD_ROWS = [
    ('{"chosen": "a", "rejected": "b", "user": "u"', "line 2: malformed JSON"),
    ({"chosen": "a", "rejected": "b"}, "line 2 column 'user': missing"),
    ({"chosen": "", "rejected": "b", "user": "u"}, "line 2 column 'chosen': empty"),
    ({"chosen": "  ", "rejected": "b", "user": "u"}, "line 2 column 'chosen': empty"),
    ({"chosen": "same", "rejected": "same", "user": "u"}, "chosen identical to rejected"),
    ({"chosen": 3, "rejected": "b", "user": "u"}, r"column 'chosen': not text or messages \(int\)"),
    ({"chosen": "a", "rejected": ["b"], "user": "u"}, r"'rejected': message 0 is not an object"),
    ({"chosen": "a", "rejected": "b", "user": 1.5}, "column 'user': not a user name"),
    ({"chosen": "a", "rejected": "b", "user": None}, "column 'user': missing"),
    ("[1, 2]", "line 2: not a JSON object"),
]


@pytest.mark.parametrize("bad,message", BAD_ROWS)
def test_bad_rows_are_named_or_counted(tmp_path, bad, message):
    src = write_jsonl(tmp_path / "d.jsonl", [GOOD[0], bad, GOOD[1]])
    with pytest.raises(DataError, match=message) as err:
        read_preferences(src)
    assert str(tmp_path / "d.jsonl") in str(err.value) and "\n" not in str(err.value)
    data, report = read_preferences(src, on_bad_rows="skip")
    assert len(data) == 2 and report.rows == 3 and sum(report.skipped.values()) == 1
    assert "kept 2 of 3 rows" in report.summary()


def test_every_bad_row_is_reported(tmp_path):
    rows = [GOOD[0]] + [{"chosen": "", "rejected": "b", "user": "u"}] * 5
    with pytest.raises(DataError, match=r"5 bad row\(s\): line 2 .*line 3 .*line 4 .*2 more"):
        read_preferences(write_jsonl(tmp_path / "d.jsonl", rows))


def test_csv_bad_row_names_row_and_keeps_numeric_text(tmp_path):
    src = tmp_path / "d.csv"
    src.write_text("prompt,chosen,rejected,user\nq,42,b,1\nq,,b,2\n")
    with pytest.raises(DataError, match="row 2 column 'chosen': empty"):
        read_preferences(str(src))
    data, _ = read_preferences(str(src), on_bad_rows="skip")
    assert data[0].chosen == "42"


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_file(tmp_path, content):
    (tmp_path / "e.jsonl").write_text(content)
    with pytest.raises(DataError, match="empty"):
        read_preferences(str(tmp_path / "e.jsonl"))


def test_missing_column_lists_existing(tmp_path):
    src = tmp_path / "d.csv"
    src.write_text("question,good,bad,worker\nq,a,b,1\n")
    with pytest.raises(DataError, match=r"missing column\(s\) 'chosen'.*columns are: question"):
        read_preferences(str(src))
    cols = Columns(prompt="question", chosen="good", rejected="bad", user="worker")
    data, _ = read_preferences(str(src), cols)
    assert (data[0].prompt, data[0].chosen, data[0].user) == ("q", "a", "1")
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"good": "a", "bad": "b", "worker": 1}])
    with pytest.raises(DataError, match="missing column.*columns are: bad, good, worker"):
        read_preferences(jsonl)


@pytest.mark.parametrize("src", ["nope.jsonl", "data.txt", "builtin:other"])
def test_unreadable_sources(src):
    with pytest.raises(DataError, match=src):
        read_preferences(src)


def _rows(n_users=4, per_user=30, groups=False):
    return [
        Comparison("p", f"c{u}-{i}", f"r{u}-{i}", f"u{u}", group=f"g{i % 10}" if groups else None)
        for u in range(n_users)
        for i in range(per_user + 5 * u)
    ]


def test_split_is_deterministic_and_fractions_hold():
    data = _rows()
    a = split_per_user(data, SplitConfig(val=0.1, test=0.2, seed=3, val_by="row"))
    b = split_per_user(data, SplitConfig(val=0.1, test=0.2, seed=3, val_by="row"))
    c = split_per_user(data, SplitConfig(val=0.1, test=0.2, seed=4, val_by="row"))
    assert a.manifest == b.manifest and a.manifest["sha256"] != c.manifest["sha256"]
    assert a.manifest["users"]["u0"] == {"train": 21, "val": 3, "test": 6}
    seen = [(x.chosen) for part in (a.train, a.val, a.test) for x in part]
    assert sorted(seen) == sorted(x.chosen for x in data)  # a partition: nothing lost, no overlap


def test_group_column_keeps_items_in_one_split():
    s = split_per_user(_rows(groups=True), SplitConfig(val=0.2, test=0.3, seed=0))
    where = {}
    for part in ("train", "val", "test"):
        for x in getattr(s, part):
            assert where.setdefault(x.group, part) == part


def test_user_selection_options(tmp_path):
    data = _rows(n_users=5)  # users have 30, 35, 40, 45, 50
    s = split_per_user(data, SplitConfig(top_users=3, max_per_user=7, seed=0))
    assert sorted(s.manifest["users"]) == ["u2", "u3", "u4"]
    assert all(v["train"] == 7 for v in s.manifest["users"].values())
    s = split_per_user(data, SplitConfig(min_per_user=41, holdout_users=1, seed=0))
    assert len(s.manifest["users"]) + len(s.manifest["holdout_users"]) == 2
    assert {x.user for x in s.holdout}.isdisjoint(x.user for x in s.train + s.val + s.test)
    s.write_manifest(tmp_path / "split.json")
    assert json.loads((tmp_path / "split.json").read_text())["sizes"]["holdout"] == len(s.holdout)
    with pytest.raises(DataError, match="min-per-user"):
        split_per_user(data, SplitConfig(min_per_user=1000))
    with pytest.raises(ValueError, match="val \\+ test"):
        SplitConfig(val=0.5, test=0.5)


def test_demo_is_deterministic_readable_and_documented():
    a, pa = generate(0)
    b, _ = generate(0)
    assert a == b and generate(1)[0] != a
    users = {c.user for c in a}
    assert 8 <= len(users) <= 12
    per_user = [sum(c.user == u for c in a) for u in users]
    assert min(per_user) >= 50 and max(per_user) <= 200
    assert all(c.chosen != c.rejected and c.prompt.endswith("?") for c in a)
    ceiling = ceiling_accuracy(0)
    assert 0.75 < ceiling < 0.95 and ceiling == pytest.approx(sum(pa) / len(pa), abs=0.2)
    data, _ = read_preferences("builtin:demo")
    assert data == a


TLDR_RECORDS = [
    {
        "info": {"post": f"post {i}", "title": f"t{i}", "subreddit": "cats"},
        "summaries": [{"text": f"  first {i} "}, {"text": f"second {i}\n"}],
        "choice": i % 2,
        "worker": w,
    }
    for i, w in enumerate(["w1"] * 4 + ["w2"] * 3 + ["w3"] * 2 + ["w4"])
] + [
    {
        "info": {"article": "cnn", "title": "x", "subreddit": None, "post": None},
        "summaries": [{"text": "a"}, {"text": "b"}],
        "choice": 0,
        "worker": "w1",
    }
]


def _hub_dir(tmp_path, name, splits):
    root = tmp_path / name
    for split, records in splits.items():
        (root / "data").mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(records).to_parquet(str(root / "data" / f"{split}-0.parquet"))
    return str(root)


def test_tldr_rows_format_identically():
    rows = tldr_rows(TLDR_RECORDS)
    assert len(rows) == 10  # the CNN/DM row without a post is left out
    r = rows[1]  # choice 1
    assert r["prompt"] == "SUBREDDIT: r/cats\nTITLE: t1\nPOST: post 1\nTL;DR:"
    assert (r["chosen"], r["rejected"]) == (" second 1", " first 1")


def test_build_tldr_top_workers_balanced(tmp_path, monkeypatch):
    import datasets as ds

    src = _hub_dir(tmp_path, "tldr", {"train": TLDR_RECORDS, "validation": TLDR_RECORDS[:7]})
    real = ds.load_dataset
    monkeypatch.setattr(ds, "load_dataset", lambda s, c, split: real(s, split=split))
    info = build_tldr(tmp_path / "out.jsonl", top_k=2, seed=0, source=src)
    assert info["workers"] == ["w1", "w2"] and info["train"] == 6 and info["validation"] == 6
    train, _ = read_preferences(str(tmp_path / "out.jsonl"))
    assert sorted(c.user for c in train) == ["w1"] * 3 + ["w2"] * 3


HS2 = [
    {
        "prompt": "P",
        "response": "R1",
        "helpfulness": 3,
        "correctness": 2,
        "coherence": 4,
        "complexity": 1,
        "verbosity": 1,
    },
    {
        "prompt": "P",
        "response": "R2",
        "helpfulness": 1,
        "correctness": 2,
        "coherence": 4,
        "complexity": 2,
        "verbosity": 0,
    },
]


def test_helpsteer2_pairs_and_ties(tmp_path, monkeypatch):
    rows = helpsteer2_rows(HS2)
    assert {(r["user"], r["chosen"]) for r in rows} == {
        ("helpfulness", "R1"),
        ("complexity", "R2"),
        ("verbosity", "R1"),
    }
    assert len(helpsteer2_rows(HS2, ties="random", seed=0)) == 5
    assert helpsteer2_rows(HS2, ties="random", seed=0) == helpsteer2_rows(HS2, "random", 0)
    import datasets as ds

    src = _hub_dir(tmp_path, "hs2", {"train": HS2, "validation": HS2})
    real = ds.load_dataset
    monkeypatch.setattr(ds, "load_dataset", lambda s, c, split: real(s, split=split))
    assert build_helpsteer2(tmp_path / "hs.jsonl", source=src)["train"] == 3


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_backbone(DEFAULT_BACKBONE))


def test_truncation_keeps_response_and_cuts_prompt_left(tokenizer):
    enc = PairTokenizer(tokenizer, max_length=10)
    out = enc(["one two three four five six seven eight"], ["alpha beta gamma"])
    text = tokenizer.decode(out["input_ids"][0])
    assert text == "[CLS] five six seven eight [SEP] alpha beta gamma [SEP]" and enc.truncated == 1
    out = enc([""], ["a b c d e f g h i j k l"])
    assert len(out["input_ids"][0]) <= 10 and enc.truncated == 2


def test_batches_stack_chosen_then_rejected(tokenizer):
    data = [
        Comparison("Q?", "good long answer here", "bad", "bob"),
        Comparison("Q?", "ok", "meh answer", "ann"),
    ]
    ds_ = PairDataset(data, UserVocab(["ann", "bob"]), PairTokenizer(tokenizer, 32))
    batch = ds_.collate([ds_[0], ds_[1]])
    assert batch["input_ids"].shape[0] == 4 and batch["user_ids"].tolist() == [1, 0, 1, 0]
    assert batch["attention_mask"].sum(1).tolist() == [len(x) for x in ds_.chosen["input_ids"]] + [
        len(x) for x in ds_.rejected["input_ids"]
    ]
    assert torch.equal(batch["input_ids"][0, :8], torch.tensor(ds_.chosen["input_ids"][0][:8]))


def test_a_user_whose_groups_all_fall_outside_train_is_dropped_and_counted():
    # "lonely" judged two items only; with a seed that puts both in val/test the user would
    # have rows to evaluate but no row to train on.
    data = _rows(groups=True)
    split = SplitConfig(val=0.2, test=0.3, seed=0)
    base = split_per_user(data, split)
    outside = sorted({x.group for x in base.val + base.test})[:2]
    lonely = [Comparison("p", f"a{g}", f"b{g}", "lonely", g) for g in outside]
    s = split_per_user(data + lonely, split)
    assert "lonely" not in s.users and "lonely" not in s.manifest["users"]
    assert s.manifest["dropped_without_training_rows"]["lonely"]["train"] == 0
    assert all(x.user != "lonely" for x in s.val + s.test)


def test_holdout_of_every_user_is_a_clear_error():
    with pytest.raises(DataError, match="--holdout-users 2 leaves no user to train on"):
        split_per_user(_rows(n_users=2), SplitConfig(holdout_users=2))
    with pytest.raises(DataError, match="--holdout-users 5 leaves no user"):
        split_per_user(_rows(n_users=2), SplitConfig(holdout_users=5))  # not "Sample larger"


def test_gz_output_is_gzip_and_reads_back(tmp_path):
    out = tmp_path / "prefs.jsonl.gz"
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "user": "u"}]
    assert write_rows(rows, out) == 1
    with gzip.open(out, "rt") as f:
        assert json.loads(f.readline()) == rows[0]
    assert read_preferences(str(out))[0][0].chosen == "a"
    assert validation_path(out).name == "prefs.validation.jsonl.gz"


def test_split_column_fixes_the_test_rows_and_val_comes_from_the_rest(tmp_path):
    rows = [
        {
            "chosen": f"a{i}",
            "rejected": f"b{i}",
            "user": f"u{i % 2}",
            "split": "test" if i % 5 == 0 else "train",
        }  # fmt: skip
        for i in range(60)
    ]
    path = tmp_path / "fixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data, _ = read_preferences(str(path), Columns(split="split"))
    s = split_per_user(data, SplitConfig(val=0.2, test=0.0, seed=0, val_by="row"))
    assert {c.chosen for c in s.test} == {f"a{i}" for i in range(0, 60, 5)}
    assert len(s.val) == 2 * round(24 * 0.2) and not {c.split for c in s.train + s.val} - {"train"}
    assert split_per_user(data, SplitConfig(val=0.2, test=0.0)).manifest["val_by"] == "text"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**rows[0], "split": "dev"}) + "\n")
    with pytest.raises(DataError, match="column 'split': not one of train, test"):
        read_preferences(str(bad), Columns(split="split"))


def _shared_texts(n_users=4, n_texts=40, seed=0):
    """Every user compares random pairs over one catalogue of texts (as Jester's jokes)."""
    import random

    rng = random.Random(seed)
    return [
        Comparison("q", f"t{a}", f"t{b}", f"u{u}")
        for u in range(n_users)
        for a, b in (rng.sample(range(n_texts), 2) for _ in range(60))
    ]


def test_val_by_text_holds_out_texts_that_no_training_pair_holds():
    data = _shared_texts()
    s = split_per_user(data, SplitConfig(val=0.2, test=0.0, seed=3, val_by="text"))
    train_texts = {t for c in s.train for t in (c.chosen, c.rejected)}
    val_texts = {t for c in s.val for t in (c.chosen, c.rejected)}
    # Both texts of every validation pair are new to training (for every user), as in a test
    # of new texts; a pair of one held-out and one training text is in neither split.
    assert val_texts and not val_texts & train_texts
    dropped = s.manifest["sizes"]["dropped_between_train_and_val"]
    assert dropped > 0 and len(s.train) + len(s.val) + dropped == len(data)
    assert 0.1 < len(s.val) / len(data) < 0.3
    assert s.manifest["validation_pairs_with_seen_texts"] == 0.0
    assert validation_warning(s) is None


def test_a_random_validation_over_seen_texts_warns_when_the_test_is_new():
    data = _shared_texts()
    s = split_per_user(data, SplitConfig(val=0.2, test=0.0, seed=3, val_by="row"))
    assert s.manifest["validation_pairs_with_seen_texts"] > 0.5
    assert "--val-by text" in validation_warning(s)  # no test: the model may meet new texts
    new = [Comparison("q", f"n{i}", f"m{i}", "u0") for i in range(5)]
    assert "mostly hold new texts" in validation_warning(replace(s, test=new))
    assert validation_warning(replace(s, test=s.val)) is None  # a test over seen texts
    with pytest.raises(DataError, match="--val-by group needs a group column"):
        split_per_user(data, SplitConfig(val_by="group"))
    with pytest.raises(ValueError, match="val_by must be one of"):
        SplitConfig(val_by="joke")

"""Dataset builders (``sharelora prepare``): Reddit TL;DR comparisons and HelpSteer2.

Both read the hub datasets with ``datasets.load_dataset`` (``source`` may also be a local
directory in the hub's layout) and write our JSONL: ``prompt, chosen, rejected, user``.
"""

from __future__ import annotations

import collections
import gzip
import json
import random
from collections.abc import Iterable
from pathlib import Path

from .records import DataError

TLDR_SOURCE = "openai/summarize_from_feedback"
HELPSTEER2_SOURCE = "nvidia/HelpSteer2"
HELPSTEER2_ATTRIBUTES = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]


def _load(source: str, config: str | None, split: str):
    import datasets

    try:
        return datasets.load_dataset(source, config, split=split)
    except Exception as err:  # hub, network and schema errors all mean "cannot build"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(
            f"{source}: cannot load split {split!r} ({first}); if the Hugging Face Hub is "
            "unreachable, pass --source with a local copy"
        ) from err


def write_jsonl(rows: Iterable[dict], path: str | Path) -> int:
    """Write rows as JSON lines, gzip-compressed when ``path`` ends in ``.gz``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def validation_path(output: Path) -> Path:
    """``train.jsonl`` -> ``train.validation.jsonl``; ``x.jsonl.gz`` -> ``x.validation.jsonl.gz``
    (every suffix stays, so the reader still knows the format)."""
    suffixes = "".join(output.suffixes[-2:] if output.suffix == ".gz" else output.suffixes[-1:])
    stem = output.name[: len(output.name) - len(suffixes)]
    return output.with_name(stem + ".validation" + suffixes)


# ------------------------------------------------------------------------------------- TL;DR
def tldr_prompt(info: dict) -> str:
    return f"SUBREDDIT: r/{info['subreddit']}\nTITLE: {info['title']}\nPOST: {info['post']}\nTL;DR:"


def tldr_summary(text: str) -> str:
    """Both summaries of a pair go through this one function: a formatting difference between
    chosen and rejected is a label leak."""
    return " " + text.strip()


def tldr_rows(records: Iterable[dict]) -> list[dict]:
    rows = []
    for rec in records:
        if rec.get("worker") in (None, "") or rec.get("info", {}).get("post") is None:
            continue  # summarize_from_feedback has CNN/DM rows with an article and no post
        summaries = [s["text"] for s in rec["summaries"]]
        choice = int(rec["choice"])
        chosen, rejected = tldr_summary(summaries[choice]), tldr_summary(summaries[1 - choice])
        assert (
            chosen[:1] == rejected[:1] == " "
            and chosen == chosen.rstrip()
            and rejected == rejected.rstrip()
        ), "chosen and rejected must be formatted identically"
        if chosen == rejected:
            continue
        rows.append(
            {
                "prompt": tldr_prompt(rec["info"]),
                "chosen": chosen,
                "rejected": rejected,
                "user": rec["worker"],
            }
        )
    return rows


def balance_workers(rows: list[dict], workers: list[str], seed: int) -> list[dict]:
    """Each of ``workers`` downsampled (seeded) to the smallest count among them."""
    by_worker = collections.defaultdict(list)
    for row in rows:
        if row["user"] in workers:
            by_worker[row["user"]].append(row)
    n = min((len(by_worker[w]) for w in workers), default=0)
    rng = random.Random(seed)
    out = []
    for w in workers:
        out.extend(rng.sample(by_worker[w], n))
    return out


def build_tldr(output: str | Path, top_k: int = 5, seed: int = 0, source: str = TLDR_SOURCE):
    """The reference code's protocol: the top-K workers by training count, each downsampled to
    the same count, separately for train and validation. Writes ``OUTPUT`` (train) and
    ``OUTPUT`` with ``.validation`` before the suffix (per-worker validation sets)."""
    train = tldr_rows(_load(source, "comparisons", "train"))
    counts = collections.Counter(r["user"] for r in train)
    workers = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]]
    val = tldr_rows(_load(source, "comparisons", "validation"))
    output = Path(output)
    val_path = validation_path(output)
    n_train = write_jsonl(balance_workers(train, workers, seed), output)
    n_val = write_jsonl(balance_workers(val, workers, seed), val_path)
    return {
        "workers": workers,
        "train": n_train,
        "validation": n_val,
        "files": [str(output), str(val_path)],
    }


# --------------------------------------------------------------------------------- HelpSteer2
def helpsteer2_rows(records: Iterable[dict], ties: str = "drop", seed: int = 0) -> list[dict]:
    """Every two responses to the same prompt form a pair, once per attribute (= user).

    A tie on an attribute is dropped, or with ``ties="random"`` broken by a seeded coin.
    """
    if ties not in ("drop", "random"):
        raise ValueError(f"ties must be 'drop' or 'random', got {ties!r}")
    rng = random.Random(seed)
    by_prompt: dict[str, list[dict]] = collections.defaultdict(list)
    for rec in records:
        by_prompt[rec["prompt"]].append(rec)
    rows = []
    for prompt, responses in by_prompt.items():
        for i in range(len(responses)):
            for j in range(i + 1, len(responses)):
                a, b = responses[i], responses[j]
                if a["response"] == b["response"]:
                    continue
                for attr in HELPSTEER2_ATTRIBUTES:
                    if a[attr] == b[attr]:
                        if ties == "drop":
                            continue
                        first = rng.random() < 0.5
                    else:
                        first = a[attr] > b[attr]
                    win, lose = (a, b) if first else (b, a)
                    rows.append(
                        {
                            "prompt": prompt,
                            "chosen": win["response"],
                            "rejected": lose["response"],
                            "user": attr,
                        }
                    )
    return rows


def build_helpsteer2(
    output: str | Path, ties: str = "drop", seed: int = 0, source: str = HELPSTEER2_SOURCE
):
    """Writes ``OUTPUT`` (from the hub's train split) and ``OUTPUT`` with ``.validation``."""
    output = Path(output)
    val_path = validation_path(output)
    n_train = write_jsonl(helpsteer2_rows(_load(source, None, "train"), ties, seed), output)
    n_val = write_jsonl(helpsteer2_rows(_load(source, None, "validation"), ties, seed), val_path)
    return {
        "users": HELPSTEER2_ATTRIBUTES,
        "train": n_train,
        "validation": n_val,
        "files": [str(output), str(val_path)],
    }

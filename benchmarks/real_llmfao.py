"""LLM responses judged by crowd workers (LLMFAO): personalization on LLM-response data.

Protocol (shared/data/llmfao/README.md): workers with at least 20 judgements; split by
``pair_id`` into train/validation/test 70/10/20 with the seed; the first n of each worker's
training pairs (``--n all``: every one). MiniLM with adapters in the top block, every
personalized method from the cell's ``shared`` model, beside the compute control
(``real_grid``). Responses are long: the prompt is cut from the left to ``--max-length``.

    python benchmarks/real_llmfao.py [--quick] [--n 10] [--seeds 0,1,2] [--methods ...] [--json F]

Resumes cell by cell. Writes FILE (default benchmarks/results/real_llmfao.json) and FILE.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from real_grid import finish, open_store, run_cell

from sharelora.data import Columns, SplitConfig, read_preferences, split_per_user

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "llmfao" / "pairs.jsonl.gz"
METHODS = "shared,shared+from-shared,independent,sharelora,sharelora+unpooled,head,core,diag"


def args_():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="n=10, seed 0, four methods")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--n", default="10")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "real_llmfao.json"))
    args = p.parse_args()
    if args.quick:
        args.n, args.seeds = "10", "0"
        args.methods = "shared,shared+from-shared,sharelora,head"
    return args


def main() -> None:
    args, started = args_(), time.time()
    path = Path(args.json)
    settings = {"epochs": args.epochs, "lr": args.lr, "max_length": args.max_length,
                "top_layers": 1, "from_shared": True}  # fmt: skip
    store = open_store(path, settings)
    # 531 rows have an empty response (a model that answered nothing): skipped, as counted.
    rows, report = read_preferences(args.data, Columns(group="pair_id"), on_bad_rows="skip")
    print(report.summary(), flush=True)
    for seed in map(int, args.seeds.split(",")):
        cache = None
        for n in args.n.split(","):
            cap = None if n == "all" else int(n)
            cfg = SplitConfig(val=0.1, test=0.2, seed=seed, min_per_user=20, max_per_user=cap)
            splits = split_per_user(rows, cfg)
            k = len(splits.users)
            cache = run_cell(store, path, "pair_id", k, n, seed, args.methods.split(","), splits,
                             args, cache)  # fmt: skip
    finish(store, path, METHODS.split(","), "LLMFAO", started)


if __name__ == "__main__":
    main()

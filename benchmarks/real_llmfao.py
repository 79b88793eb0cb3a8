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

import time
from pathlib import Path

from real_grid import QUICK_METHODS, finish, open_store, parser, run_cell

from sharelora.data import Columns, SplitConfig, read_preferences, split_per_user

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "llmfao" / "pairs.jsonl.gz"


def args_():
    p = parser(__doc__, DATA, "real_llmfao", n="10")
    p.add_argument("--quick", action="store_true", help="n=10, seed 0, four methods")
    args = p.parse_args()
    if args.quick:
        args.n, args.seeds, args.methods = "10", "0", QUICK_METHODS
    return args


def read_rows(path=DATA):
    """The protocol's rows: 531 have an empty response (a model that answered nothing) and are
    skipped, as the report counts."""
    return read_preferences(path, Columns(group="pair_id"), on_bad_rows="skip")


def protocol_splits(rows, seed: int, cap: int | None, val: float = 0.1):
    """Workers with at least 20 judgements, 20% test by ``pair_id``, the first ``cap``
    training pairs of each."""
    cfg = SplitConfig(val=val, test=0.2, seed=seed, min_per_user=20, max_per_user=cap)
    return split_per_user(rows, cfg)


def main() -> None:
    args, started = args_(), time.time()
    path = Path(args.json)
    store = open_store(path, args)
    rows, report = read_rows(args.data)
    print(report.summary(), flush=True)
    for seed in map(int, args.seeds.split(",")):
        cache = None
        for n in args.n.split(","):
            splits = protocol_splits(rows, seed, None if n == "all" else int(n))
            k = len(splits.users)
            cache = run_cell(store, path, "pair_id", k, n, seed, args.methods.split(","), splits,
                             args, cache)  # fmt: skip
    finish(store, path, "LLMFAO", started)


if __name__ == "__main__":
    main()

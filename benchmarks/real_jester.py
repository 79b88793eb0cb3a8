"""Real per-person joke preferences (Jester): does personalization pay where people differ?

Protocols (shared/data/jester/README.md), both run:
- ``new``: the file's ``split`` (test jokes never seen in training); validation carved by joke
  (``val_by="text"``: a validation pair holds a joke no training pair holds);
- ``seen``: split by ``pair_id`` 80/20 ignoring ``split``, validation 10% by ``pair_id``.
Users with at least 50 training and 10 test pairs under the protocol, a seeded sample of K;
the first n of each user's training pairs after a seeded shuffle. MiniLM with adapters in the
top block (``real_grid``). Every personalized method starts from the cell's ``shared`` model;
``shared+from-shared`` is the compute control. Hyperparameters are the same for every method;
only the strength is chosen, on validation.

    python benchmarks/real_jester.py [--quick] [--protocols new,seen] [--k 100] [--n 10,25,50]
                                     [--seeds 0,1,2] [--methods ...] [--json FILE]

Resumes cell by cell. Writes FILE (default benchmarks/results/real_jester.json; its cells hold
protocol, method, n, seed, macro_accuracy, micro_accuracy, ...) and FILE.md (tables).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from real_grid import QUICK_METHODS, finish, open_store, parser, run_cell

from sharelora.data import Columns, SplitConfig, read_preferences, split_per_user

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "jester" / "pairs.jsonl.gz"
PROTOCOLS = {
    "new": {"columns": Columns(group="pair_id", split="split"), "test": 0.0},
    "seen": {"columns": Columns(group="pair_id"), "test": 0.2},
}


def args_():
    p = parser(__doc__, DATA, "real_jester", n="10,25,50")
    p.add_argument("--quick", action="store_true", help="K=50, n=10, seed 0, four methods")
    p.add_argument("--protocols", default="new,seen")
    p.add_argument("--k", type=int, default=100)
    args = p.parse_args()
    if args.quick:
        args.k, args.n, args.seeds, args.methods = 50, "10", "0", QUICK_METHODS
    return args


def protocol_splits(rows, protocol: str, k: int, n: int, seed: int):
    """The protocol's split of a seeded sample of ``k`` eligible users, ``n`` pairs each."""
    test = PROTOCOLS[protocol]["test"]
    # Eligibility counts a user's training rows before validation is carved from them.
    full = split_per_user(rows, SplitConfig(val=0.0, test=test, seed=seed))
    eligible = sorted(
        u for u, c in full.manifest["users"].items() if c["train"] >= 50 and c["test"] >= 10
    )
    if len(eligible) < k:
        raise SystemExit(f"{protocol}: only {len(eligible)} users are eligible, asked for {k}")
    users = set(random.Random(seed).sample(eligible, k))
    mine = [c for c in rows if c.user in users]
    return split_per_user(mine, SplitConfig(val=0.1, test=test, seed=seed, max_per_user=n))


def main() -> None:
    args, started = args_(), time.time()
    path = Path(args.json)
    store = open_store(path, args)
    methods = args.methods.split(",")
    for protocol in args.protocols.split(","):
        rows, report = read_preferences(args.data, PROTOCOLS[protocol]["columns"])
        print(f"{protocol}: {report.summary()}", flush=True)
        for seed in map(int, args.seeds.split(",")):
            cache = None
            for n in map(int, args.n.split(",")):
                splits = protocol_splits(rows, protocol, args.k, n, seed)
                cache = run_cell(
                    store, path, protocol, args.k, n, seed, methods, splits, args, cache
                )
    finish(store, path, "Jester", started)


if __name__ == "__main__":
    main()

"""Step time and peak memory as the number of users N grows.

Setting as overhead.py (MiniLM, r=8, query+value, 16 pairs x 128 tokens, 5 users of the N in
each batch). Rows:
  * sharelora / core / diag with row-sparse user tables and lazy Adam (our default from 256 users);
  * "reference design": sharelora with a dense gather and AdamW over the whole table, as the
    paper's code does (``--sparse-users off``).
Targets: sharelora at 1e4 users within 1.25x of its 5-user step; core and diag at 1e5 users
within 1.25x of theirs. Each size runs in its own process (so the peak resident memory is its
own), timing its N-user step in turns with a 5-user twin (so the ratio is side by side); the
time is the fastest of the rounds, the least disturbed by other load.

    python benchmarks/users.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
from common import (
    bt_step,
    interleaved_median,
    machine,
    minilm,
    pair_batch,
    parser,
    table,
    write_json,
)

from sharelora import AdapterConfig, PersonalizedRewardModel, build_optimizer
from sharelora.users import UserVocab

TARGET = 1.25
CONFIGS = [  # (row name, method, sparse user tables, N values)
    ("sharelora", "sharelora", True, [5, 1_000, 10_000]),
    ("reference design (dense AdamW)", "sharelora", False, [5, 1_000, 10_000]),
    ("core", "core", True, [5, 1_000, 10_000, 100_000]),
    ("diag", "diag", True, [5, 1_000, 10_000, 100_000]),
]


def _step_fn(method: str, sparse: bool, users: int):
    backbone, _ = minilm()
    model = PersonalizedRewardModel(
        backbone,
        UserVocab(range(users)),
        AdapterConfig(method=method, rank=8, targets=["query", "value"]),
    ).train()
    opt = build_optimizer(model, lr=1e-4, sparse_users=sparse)
    batch = pair_batch()
    batch["user_ids"] = batch["user_ids"] * (users // 5)  # 5 users spread over the table
    return lambda: bt_step(lambda b: model(**b), opt, batch)


def one(method: str, sparse: bool, users: int, rounds: int) -> dict:
    """Step time at ``users`` users and at 5 users, interleaved in this process (so the ratio
    is measured side by side), and this process's peak memory before the 5-user twin exists."""
    torch.manual_seed(0)
    big = _step_fn(method, sparse, users)
    big()
    big()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB
    small = _step_fn(method, sparse, 5)
    seconds = interleaved_median({"big": big, "small": small}, rounds=rounds, reduce=min)
    return {
        "seconds": seconds["big"],
        "seconds_5_users": seconds["small"],
        "ratio_vs_5_users": seconds["big"] / seconds["small"],
        "peak_gib": peak,
    }


def main():
    p = parser(__doc__)
    p.add_argument("--one", nargs=3, metavar=("METHOD", "SPARSE", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    rounds = 2 if args.quick else 4
    if args.one:
        method, sparse, users = args.one[0], args.one[1] == "1", int(args.one[2])
        print(json.dumps(one(method, sparse, users, rounds)))
        return
    results, rows = [], []
    for name, method, sparse, sizes in CONFIGS:
        for n in sizes:
            if args.quick and n == 100_000:
                continue
            cmd = [sys.executable, __file__, "--one", method, str(int(sparse)), str(n)]
            cmd += ["--quick"] if args.quick else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            results.append({"row": name, "method": method, "sparse": sparse, "users": n, **r})
            rows.append(
                [
                    name,
                    f"{n:,}",
                    r["seconds"],
                    r["seconds_5_users"],
                    r["ratio_vs_5_users"],
                    r["peak_gib"],
                ]
            )
            print(
                f"{name} N={n:,}: {r['seconds']:.3f}s vs {r['seconds_5_users']:.3f}s at 5 "
                f"users ({r['ratio_vs_5_users']:.2f}x), peak {r['peak_gib']:.2f} GiB",
                file=sys.stderr,
                flush=True,
            )
    print(f"training step vs users, MiniLM r=8 query,value, 16 pairs x 128 tokens; {machine()}")
    print(table(["row", "users", "seconds/step", "same, 5 users", "ratio", "peak RSS GiB"], rows))
    write_json(args.json, {"machine": machine(), "target": TARGET, "results": results})


if __name__ == "__main__":
    main()

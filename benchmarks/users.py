"""Step time and peak memory as the number of users N grows.

Setting as overhead.py (MiniLM, r=8, query+value, 16 pairs x 128 tokens, 5 users of the N in
each batch). Rows:
  * sharelora / core / diag with row-sparse user tables and lazy Adam (our default from 256 users);
  * "reference design": sharelora with a dense gather and AdamW over the whole table, as the
    paper's code does (``--sparse-users off``).
  * "sharelora, row-wise state": one optimizer number per user row and table
    (``--user-state rowwise``) instead of Adam's two moments per coordinate.
Before timing, no part of the tables or their optimizer state is left untouched (zeroed
memory is not resident until written): below 1e5 users every user takes one training step
(users in chunks, short texts); from 1e5 (a training pass over 1e6 users would take hours on
2 cores) one step initialises the optimizer and every element of every user table and its
state is then written in place, as a step on each user would (``--touch`` forces either way;
the two give the same peak, see docs/results.md). Targets: sharelora at 1e4 users within
1.25x of its 5-user step; core and diag at 1e5 users within 1.25x of theirs; row-wise state at
2e4 users: peak memory <= 0.5x and step time <= 1.1x of full Adam state.
Each size runs in its own process (so the peak resident memory is its
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
CONFIGS = [  # (row name, method, sparse user tables, user state, N values)
    ("sharelora", "sharelora", True, "full", [5, 1_000, 10_000, 20_000]),
    ("sharelora, row-wise state", "sharelora", True, "rowwise", [5, 10_000, 20_000, 100_000]),
    ("reference design (dense AdamW)", "sharelora", False, "full", [5, 1_000, 10_000]),
    ("core", "core", True, "full", [5, 1_000, 10_000, 100_000, 1_000_000]),
    ("diag", "diag", True, "full", [5, 1_000, 10_000, 100_000, 1_000_000]),
]
TOUCH_ROWS = 256  # users per step of the pass that trains every user once (small: its
# activations must not set the peak)
TRAIN_TOUCH_BELOW = 100_000  # from here on, --touch auto writes the tables instead


def _touch(model, opt, users: int, how: str) -> None:
    """Make every user's rows and optimizer state resident: ``train`` steps every user once,
    ``write`` steps the first ``TOUCH_ROWS`` users (the optimizer's state exists) and then
    writes every element of each user table and its state in place."""
    train = how == "train" or (how == "auto" and users < TRAIN_TOUCH_BELOW)
    for start in range(0, users if train else min(users, TOUCH_ROWS), TOUCH_ROWS):
        ids = torch.arange(start, min(start + TOUCH_ROWS, users))
        rows = pair_batch(pairs=len(ids), length=8, users=1)
        rows["user_ids"] = torch.cat([ids, ids])
        bt_step(lambda b: model(**b), opt, rows)
    if not train:
        with torch.no_grad():
            for table in model.user_parameters():
                for t in (table, *opt.state[table].values()):
                    t.mul_(1)


def _step_fn(method: str, sparse: bool, state: str, users: int, touch: str | None = None):
    backbone, _ = minilm()
    model = PersonalizedRewardModel(
        backbone,
        UserVocab(range(users)),
        AdapterConfig(method=method, rank=8, targets=["query", "value"]),
    ).train()
    opt = build_optimizer(model, lr=1e-4, sparse_users=sparse, user_state=state)
    if touch:
        _touch(model, opt, users, touch)
    batch = pair_batch()
    batch["user_ids"] = batch["user_ids"] * (users // 5)  # 5 users spread over the table
    return lambda: bt_step(lambda b: model(**b), opt, batch)


def one(method: str, sparse: bool, state: str, users: int, rounds: int, touch: str) -> dict:
    """Step time at ``users`` users and at 5 users, interleaved in this process (so the ratio
    is measured side by side), and this process's peak memory before the 5-user twin exists."""
    torch.manual_seed(0)
    big = _step_fn(method, sparse, state, users, touch=touch)
    big()
    big()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB
    small = _step_fn(method, sparse, state, 5)
    seconds = interleaved_median({"big": big, "small": small}, rounds=rounds, reduce=min)
    return {
        "seconds": seconds["big"],
        "seconds_5_users": seconds["small"],
        "ratio_vs_5_users": seconds["big"] / seconds["small"],
        "peak_gib": peak,
        "peak_kib_per_user": peak * 1024**2 / users,
    }


def main():
    p = parser(__doc__)
    p.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # METHOD SPARSE STATE N
    p.add_argument("--rows", help="only the rows whose name contains this, e.g. row-wise")
    p.add_argument("--max-users", type=int, help="skip sizes above this")
    p.add_argument("--min-users", type=int, help="skip sizes below this")
    p.add_argument("--touch", choices=["auto", "train", "write"], default="auto")
    args = p.parse_args()
    rounds = 2 if args.quick else 4
    if args.one:
        method, sparse, state, users = args.one[0], args.one[1] == "1", args.one[2], args.one[3]
        print(json.dumps(one(method, sparse, state, int(users), rounds, args.touch)))
        return
    results, rows = [], []
    for name, method, sparse, state, sizes in CONFIGS:
        if args.rows and args.rows not in name:
            continue
        for n in sizes:
            too_big = (args.quick and n >= 100_000) or (args.max_users and n > args.max_users)
            if too_big or (args.min_users and n < args.min_users):
                continue
            cmd = [sys.executable, __file__, "--one", method, str(int(sparse)), state, str(n)]
            cmd += ["--touch", args.touch] + (["--quick"] if args.quick else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            forced = {} if args.touch == "auto" else {"touch": args.touch}
            results.append(
                {"row": name, "method": method, "sparse": sparse, "state": state, "users": n,
                 **forced, **r}
            )  # fmt: skip
            rows.append(
                [
                    name,
                    f"{n:,}",
                    r["seconds"],
                    r["seconds_5_users"],
                    r["ratio_vs_5_users"],
                    r["peak_gib"],
                    r["peak_kib_per_user"],
                ]
            )
            print(
                f"{name} N={n:,}: {r['seconds']:.3f}s vs {r['seconds_5_users']:.3f}s at 5 "
                f"users ({r['ratio_vs_5_users']:.2f}x), peak {r['peak_gib']:.2f} GiB",
                file=sys.stderr,
                flush=True,
            )
    print(f"training step vs users, MiniLM r=8 query,value, 16 pairs x 128 tokens; {machine()}")
    headers = ["row", "users", "seconds/step", "same, 5 users", "ratio", "peak RSS GiB"]
    print(table([*headers, "peak KiB per user"], rows))
    by = {(r["row"], r["users"]): r for r in results}
    for n in sorted({r["users"] for r in results}):
        full, row = by.get(("sharelora", n)), by.get(("sharelora, row-wise state", n))
        if full and row:
            print(
                f"row-wise vs full Adam state at {n:,} sharelora users: memory "
                f"{row['peak_gib'] / full['peak_gib']:.2f}x, step time "
                f"{row['seconds'] / full['seconds']:.2f}x"
            )
    write_json(args.json, {"machine": machine(), "target": TARGET, "results": results})


if __name__ == "__main__":
    main()

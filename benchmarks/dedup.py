"""Evaluation that scores each distinct (user, text) once, against one forward per pair side.

    python benchmarks/dedup.py [--quick] [--json out.json]

On UKPConvArg1 (K=20 workers, split by pair_id) and Jester (K=100 users, new-jokes protocol:
the file's split), as the real-data benchmarks run them (MiniLM, adapters in the top block,
frozen blocks cached): the seconds of one pass over the validation and the test pairs with
``predict_margins(distinct=False)`` (before) and ``distinct=True`` (now), timed in turns, and
the largest difference of their margins. ``shared`` scores a text once for all users.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from common import machine, parser, table, write_json

from sharelora import AdapterConfig, PersonalizedRewardModel
from sharelora.data import Columns, SplitConfig, read_preferences, split_per_user
from sharelora.evaluate import predict_margins
from sharelora.pairs import PairRun
from sharelora.prefix import PrefixCache

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def load(name: str, quick: bool):
    if name == "ukp":
        data, _ = read_preferences(
            str(DATA / "ukp-convarg1" / "pairs.jsonl.gz"), Columns(group="pair_id"), "skip"
        )
        cfg = SplitConfig(val=0.1, test=0.2, top_users=5 if quick else 20, seed=0)
        splits = split_per_user(data, cfg)
        return splits.users, splits.val + splits.test
    data, _ = read_preferences(str(DATA / "jester" / "pairs.jsonl.gz"))
    users = sorted({c.user for c in data})[: 20 if quick else 100]
    chosen = set(users)
    return users, [c for c in data if c.user in chosen]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    rows, payload = [], {"machine": machine()}
    for name in ("ukp", "jester"):
        users, pairs = load(name, args.quick)
        for method in ("sharelora", "shared"):
            torch.manual_seed(0)
            model = PersonalizedRewardModel.from_backbone(
                "minilm", users, AdapterConfig(method=method, top_layers=1), max_length=256
            )
            run = PairRun(model, None, pairs, 256, PrefixCache(model), progress=False)
            times = {False: [], True: []}
            for _ in range(args.rounds):
                for distinct in (False, True):
                    start = time.perf_counter()
                    margins = predict_margins(model, run.val, 32, run=run, distinct=distinct)
                    times[distinct].append(time.perf_counter() - start)
                    if distinct:
                        after = margins
                    else:
                        before = margins
            diff = max(abs(a - b) for a, b in zip(before, after, strict=True))
            distinct_rows = len(run.distinct_rows(run.val, method == "shared"))
            t0, t1 = min(times[False]), min(times[True])
            rows.append([name, method, len(pairs), distinct_rows, t0, t1, t0 / t1, f"{diff:.1e}"])
            payload[f"{name}/{method}"] = {
                "pairs": len(pairs),
                "distinct_rows": distinct_rows,
                "seconds_per_pair_side": t0,
                "seconds_distinct": t1,
                "max_abs_margin_diff": diff,
            }
    print(f"{machine()}; one evaluation pass (best of {args.rounds}), MiniLM top block, cached")
    headers = ["data", "method", "pairs", "distinct rows", "s before", "s now", "speed-up"]
    print(table([*headers, "max |Δ margin|"], rows))
    write_json(args.json, payload)


if __name__ == "__main__":
    main()

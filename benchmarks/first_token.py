"""The last block at the scored position only (``sharelora.pooled``) against the full block.

    python benchmarks/first_token.py [--quick] [--json out.json]

On the data and setting of ``dedup.py`` (UKPConvArg1 K=20 workers, Jester K=100 users; MiniLM,
adapters in the top block, frozen blocks cached, distinct rows once): the seconds of one
evaluation pass over the validation and test pairs, and of one training epoch (forward +
backward, batches of 16) over 1,200 of those pairs, with the full top block (before) and with
it computed at position 0 only (now), timed in turns on the same model; and the largest
difference of their margins.
"""

from __future__ import annotations

import time

from common import machine, parser, table, write_json
from dedup import epoch_seconds, settings

from sharelora.evaluate import predict_margins


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    rows, payload = [], {"machine": machine()}
    for name, method, model, run, train in settings(args.quick):
        block = run.first_token
        assert block is not None, "MiniLM's top block should run at position 0 only"
        evals, epochs, margins = {}, {}, {}
        for _ in range(args.rounds):
            for first in (None, block):
                run.first_token = train.first_token = first
                start = time.perf_counter()
                margins[first is None] = predict_margins(model, run.val, 32, run=run)
                evals.setdefault(first is None, []).append(time.perf_counter() - start)
                epochs.setdefault(first is None, []).append(epoch_seconds(model, train, True))
        diff = max(abs(a - b) for a, b in zip(margins[True], margins[False], strict=True))
        e0, e1 = min(evals[True]), min(evals[False])
        t0, t1 = min(epochs[True]), min(epochs[False])
        rows.append([name, method, len(run.val), e0, e1, e0 / e1, len(train.train), t0, t1,
                     t0 / t1, f"{diff:.1e}"])  # fmt: skip
        payload[f"{name}/{method}"] = {
            "eval_pairs": len(run.val),
            "eval_seconds_full_block": e0,
            "eval_seconds_first_token": e1,
            "train_pairs": len(train.train),
            "epoch_seconds_full_block": t0,
            "epoch_seconds_first_token": t1,
            "max_abs_margin_diff": diff,
        }
    print(f"{machine()}; best of {args.rounds}; MiniLM top block, frozen blocks cached")
    headers = ["data", "method", "eval pairs", "s full", "s first", "speed-up", "train pairs",
               "epoch s full", "epoch s first", "speed-up", "max |Δ margin|"]  # fmt: skip
    print(table(headers, rows))
    write_json(args.json, payload)


if __name__ == "__main__":
    main()

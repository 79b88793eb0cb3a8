"""Evaluation that scores each distinct (user, text) once, against one forward per pair side;
and training batches that run each distinct row once.

    python benchmarks/dedup.py [--quick] [--json out.json]

On UKPConvArg1 (K=20 workers, split by pair_id) and Jester (K=100 users, new-jokes protocol:
the file's split), as the real-data benchmarks run them (MiniLM, adapters in the top block,
frozen blocks cached): the seconds of one pass over the validation and the test pairs with
``predict_margins(distinct=False)`` (before) and ``distinct=True`` (now), timed in turns, and
the largest difference of their margins. ``shared`` scores a text once for all users.

Training: one epoch of forward + backward over 1,200 of those pairs (batches of 16 in
length-grouped order, as ``train`` draws them), every row run (before) against each distinct
row of a batch run once (now, ``PairRun.rewards``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from common import machine, parser, table, write_json

from sharelora import AdapterConfig, PersonalizedRewardModel
from sharelora.batches import epoch_order
from sharelora.config import TrainConfig
from sharelora.data import Columns, SplitConfig, read_preferences, split_per_user
from sharelora.evaluate import predict_margins
from sharelora.pairs import PairRun, bt_loss, pair_rewards
from sharelora.prefix import PrefixCache

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TRAIN_PAIRS = 1200  # pairs of the training epoch timed (a quarter with --quick)


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


def settings(quick: bool):
    """Per (data, method): the model (MiniLM, adapters in the top block), an evaluation run
    over the validation and test pairs with the frozen blocks cached, and a training run over
    the first ``TRAIN_PAIRS`` of them sharing that cache."""
    for name in ("ukp", "jester"):
        users, pairs = load(name, quick)
        for method in ("sharelora", "shared"):
            torch.manual_seed(0)
            model = PersonalizedRewardModel.from_backbone(
                "minilm", users, AdapterConfig(method=method, top_layers=1), max_length=256
            )
            run = PairRun(model, None, pairs, 256, PrefixCache(model), progress=False)
            train_pairs = pairs[: TRAIN_PAIRS // (4 if quick else 1)]
            train = PairRun(model, train_pairs, None, 256, run.cache, progress=False)
            yield name, method, model, run, train


def epoch_seconds(model, run: PairRun, distinct: bool) -> float:
    """One epoch of forward + backward over ``run.train`` in batches of 16."""
    ds, share = run.train, not model.adapter_config.personalized
    order = epoch_order(len(ds), ds.lengths, TrainConfig(batch_size=16, group_by_length=True), 0)
    chosen, rejected = run.index[id(ds)]
    start = time.perf_counter()
    for b in range(0, len(order), 16):
        batch = ds.collate([ds[i] for i in order[b : b + 16]])
        if distinct:
            rewards = run.rewards(model, ds, batch, share)
        else:
            pos = batch["index"].tolist()
            inputs = {k: v for k, v in batch.items() if k != "index"}
            rows = [chosen[i] for i in pos] + [rejected[i] for i in pos]
            rewards = pair_rewards(model, inputs, run.cache, rows)
        model.zero_grad()
        bt_loss(rewards).mean().backward()
    return time.perf_counter() - start


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    rows, train_rows, payload = [], [], {"machine": machine()}
    for name, method, model, run, train_run in settings(args.quick):
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
        t0, t1, pairs = min(times[False]), min(times[True]), len(run.val)
        rows.append([name, method, pairs, distinct_rows, t0, t1, t0 / t1, f"{diff:.1e}"])
        payload[f"{name}/{method}"] = {
            "pairs": pairs,
            "distinct_rows": distinct_rows,
            "seconds_per_pair_side": t0,
            "seconds_distinct": t1,
            "max_abs_margin_diff": diff,
        }
        # Training: the first TRAIN_PAIRS of these pairs as training pairs, one epoch each.
        before = epoch_seconds(model, train_run, False)
        now = epoch_seconds(model, train_run, True)
        train_rows.append([name, method, len(train_run.train), before, now, before / now])
        payload[f"{name}/{method}"] |= {"epoch_seconds_every_row": before,
                                         "epoch_seconds_distinct": now}  # fmt: skip
    print(f"{machine()}; one evaluation pass (best of {args.rounds}), MiniLM top block, cached")
    headers = ["data", "method", "pairs", "distinct rows", "s before", "s now", "speed-up"]
    print(table([*headers, "max |Δ margin|"], rows))
    print("\none training epoch, forward + backward, batches of 16")
    print(table(["data", "method", "pairs", "s every row", "s distinct", "speed-up"], train_rows))
    write_json(args.json, payload)


if __name__ == "__main__":
    main()

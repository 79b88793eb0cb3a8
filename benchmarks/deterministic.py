"""What ``--deterministic`` costs and buys: the same demo training run twice with one seed,
with and without it; prints seconds per run and the largest adapter difference between runs.

    python benchmarks/deterministic.py            # MiniLM, every layer adapted, demo data
"""

from __future__ import annotations

import time

import torch
from common import machine, parser, table, write_json

from sharelora import AdapterConfig, PersonalizedRewardModel, TrainConfig
from sharelora.data import SplitConfig, read_preferences, split_per_user
from sharelora.recipe import train


def run_once(splits, deterministic: bool, epochs: int):
    torch.manual_seed(7)
    model = PersonalizedRewardModel.from_backbone("minilm", splits.users, AdapterConfig())
    cfg = TrainConfig(
        epochs=epochs, seed=7, max_length=64, progress=False, deterministic=deterministic
    )
    start = time.perf_counter()
    train(model, splits.train, splits.val, cfg)
    return time.perf_counter() - start, model.trainable_state_dict()


def main() -> None:
    args = parser(__doc__).parse_args()
    data, _ = read_preferences("builtin:demo")
    per_user = 12 if args.quick else 25
    splits = split_per_user(data, SplitConfig(seed=7, max_per_user=per_user, val=0.05))
    rows, payload = [], {"machine": machine(), "train_pairs": len(splits.train)}
    for deterministic in (False, True):
        (t1, a), (t2, b) = (run_once(splits, deterministic, 2) for _ in range(2))
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        rows.append([str(deterministic), (t1 + t2) / 2, f"{diff:.2e}"])
        payload[f"deterministic={deterministic}"] = {"seconds": [t1, t2], "max_abs_diff": diff}
    ratio = rows[1][1] / rows[0][1]
    print(f"{machine()}; {len(splits.train)} training pairs, 2 epochs, two runs per setting")
    print(table(["deterministic", "seconds per run", "max |Δ adapters| between runs"], rows))
    print(f"cost of --deterministic: {ratio:.2f}x the time")
    payload["time_ratio"] = ratio
    write_json(args.json, payload)


if __name__ == "__main__":
    main()

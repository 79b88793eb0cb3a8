"""Adapters in the top block only: training through the frozen-block cache against without it.

Same model (sharelora, ``--top-layers 1``, MiniLM), same data (the demo, 10 users), same seed;
one run caches the five frozen blocks once per text, the other runs them every step. Prints the
wall time of each, the speed-up, and the test accuracy of both. MiniLM has dropout in its frozen
blocks, which only the uncached path applies (the cache runs them in eval mode), so the two
accuracies agree up to that noise; without dropout they agree to float rounding
(``tests/test_prefix.py``).

    python benchmarks/prefix_cache.py [--quick] [--json FILE]
"""

from __future__ import annotations

import tempfile
import time

import torch
from common import machine, parser, table, write_json

from sharelora import DEFAULT_BACKBONE, AdapterConfig, PersonalizedRewardModel
from sharelora.data import SplitConfig, read_preferences, split_per_user
from sharelora.evaluate import evaluate
from sharelora.recipe import TrainConfig, train


def main():
    args = parser(__doc__.split("\n\n")[0]).parse_args()
    data, _ = read_preferences("builtin:demo")
    split = SplitConfig(val=0.1, test=0.25, seed=0, max_per_user=25 if args.quick else None)
    splits = split_per_user(data, split)
    rows = []
    for cache_prefix in (True, False):
        torch.manual_seed(0)
        model = PersonalizedRewardModel.from_backbone(
            DEFAULT_BACKBONE,
            splits.users,
            AdapterConfig(rank=8, alpha=16, targets=["query", "value"], top_layers=1),
            max_length=128,
        )
        cfg = TrainConfig(
            epochs=3, lr=2e-3, max_length=128, cache_prefix=cache_prefix, progress=False
        )
        started = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            run = train(model, splits.train, splits.val, cfg, tmp)
        seconds = time.time() - started
        metrics = evaluate(model, splits.test, prefix_cache=run["prefix_cache"])
        rows.append(
            [
                "cached" if cache_prefix else "uncached",
                len(splits.train),
                seconds,
                metrics["macro_accuracy"],
            ]
        )
    headers = ["frozen blocks", "train pairs", "seconds (train)", "test macro accuracy"]
    print(machine())
    print(table(headers, rows))
    print(f"speed-up of the cache: {rows[1][2] / rows[0][2]:.2f}x")
    if args.json:
        write_json(args.json, {"headers": headers, "rows": rows})


if __name__ == "__main__":
    main()

"""Training and scoring throughput on MiniLM, and what one forward for chosen+rejected buys.

Training pairs/s for sharelora (5 users) with chosen and rejected in ONE forward of 2B rows
(what the library does) against TWO forwards of B rows; scoring pairs/s without gradients; and
training pairs/s with adapters in the top block only and the frozen blocks cached
(``--top-layers 1``).

    python benchmarks/throughput.py [--quick] [--json FILE]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import (
    interleaved_median,
    machine,
    minilm,
    pair_batch,
    parser,
    table,
    write_json,
)

from sharelora import AdapterConfig, PersonalizedRewardModel, build_optimizer
from sharelora.prefix import PrefixCache

PAIRS, LENGTH = 16, 128
USERS = [f"user{i}" for i in range(5)]


def build(top_layers=None):
    backbone, tokenizer = minilm()
    cfg = AdapterConfig(rank=8, targets=["query", "value"], top_layers=top_layers)
    model = PersonalizedRewardModel(backbone, USERS, cfg, tokenizer).train()
    return model, build_optimizer(model, lr=1e-4)


def step(model, opt, forward):
    chosen, rejected = forward()
    (-F.logsigmoid(chosen - rejected).mean()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main():
    args = parser(__doc__).parse_args()
    torch.manual_seed(0)
    batch = pair_batch(PAIRS, LENGTH)
    half = {k: v[:PAIRS] for k, v in batch.items()}, {k: v[PAIRS:] for k, v in batch.items()}
    one_model, one_opt = build()
    two_model, two_opt = build()
    cached_model, cached_opt = build(top_layers=1)
    cache = PrefixCache(cached_model)

    def pad(rows):
        return {
            "input_ids": torch.stack([torch.tensor(r["input_ids"]) for r in rows]),
            "attention_mask": torch.ones(len(rows), LENGTH, dtype=torch.long),
        }

    index = cache.add({"input_ids": batch["input_ids"].tolist()}, pad, progress=False)
    hidden = cache.batch(index, batch["attention_mask"])

    def cached_forward():
        with cache.use(hidden):
            return cached_model(**batch).chunk(2)

    def score():
        with torch.no_grad():
            one_model(**batch)

    fns = {
        "train, one forward of 2B rows": lambda: step(
            one_model, one_opt, lambda: one_model(**batch).chunk(2)
        ),
        "train, two forwards of B rows": lambda: step(
            two_model, two_opt, lambda: (two_model(**half[0]), two_model(**half[1]))
        ),
        "train, top block only, cached prefix": lambda: step(
            cached_model, cached_opt, cached_forward
        ),
        "score (no grad)": score,
    }
    seconds = interleaved_median(fns, rounds=3 if args.quick else 7)
    rate = {name: PAIRS / s for name, s in seconds.items()}
    gain = seconds["train, two forwards of B rows"] / seconds["train, one forward of 2B rows"]
    print(f"MiniLM sharelora r=8, {PAIRS} pairs x {LENGTH} tokens, 5 users; {machine()}")
    print(table(["what", "seconds", "pairs/s"], [[n, seconds[n], rate[n]] for n in fns]))
    print(f"one forward for chosen+rejected is {gain:.2f}x the speed of two forwards")
    write_json(
        args.json,
        {
            "machine": machine(),
            "seconds": seconds,
            "pairs_per_second": rate,
            "one_pass_speedup": gain,
        },
    )


if __name__ == "__main__":
    main()

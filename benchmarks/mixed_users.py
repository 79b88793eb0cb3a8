"""Scoring rows of many users at once: sharelora against PEFT holding one LoRA per user and
called with ``adapter_names=[user of each row]`` (PEFT's mixed-batch inference, which loops over
the distinct adapters of a batch).

MiniLM with query/value adapted in every layer, rank 8, ROWS rows of LENGTH random tokens drawn
from U users, no gradients. Per U: rows/s of both (timed in turns, with the frozen backbone
alone beside them, so that the adapters' own cost is the difference), the time to build U
users' adapters, and the memory their parameters hold.

    python benchmarks/mixed_users.py [--quick] [--users 1,8,64,512] [--json FILE]
"""

from __future__ import annotations

import time

import torch
from common import interleaved_median, machine, minilm, parser, table, write_json
from peft import LoraConfig, get_peft_model

from sharelora import AdapterConfig, PersonalizedRewardModel

ROWS, LENGTH, BATCH, RANK = 256, 64, 64, 8
TARGETS = ["query", "value"]


def _randomized(params: list) -> int:
    """Fill the adapter tensors ``params`` with noise, so that no user's update is the zero the
    LoRA init gives; returns the bytes they hold."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return sum(p.numel() * p.element_size() for p in params)


def ours(users: int):
    backbone, _ = minilm()
    started = time.perf_counter()
    model = PersonalizedRewardModel(
        backbone, [f"u{i}" for i in range(users)], AdapterConfig(rank=RANK, targets=TARGETS)
    )
    built = time.perf_counter() - started
    held = _randomized(model.user_parameters() + model.shared_parameters())
    return model.eval(), built, held


def peft(users: int):
    backbone, _ = minilm()
    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS)
    started = time.perf_counter()
    model = get_peft_model(backbone, lora, adapter_name="u0")
    for i in range(1, users):
        model.add_adapter(f"u{i}", lora)
    built = time.perf_counter() - started
    held = _randomized([p for n, p in model.named_parameters() if "lora_" in n])
    return model.eval(), built, held


def _batches(forward):
    """Score every row, BATCH at a time, without gradients."""

    def run():
        with torch.no_grad():
            for s in range(0, ROWS, BATCH):
                forward(slice(s, s + BATCH))

    return run


def measure(users: int, ids, mask, base, rounds: int) -> dict:
    row_users = torch.arange(ROWS) % users  # every user in the batch, as evenly as can be
    names = [f"u{int(u)}" for u in row_users]
    mine, mine_built, mine_bytes = ours(users)
    theirs, theirs_built, theirs_bytes = peft(users)
    seconds = interleaved_median(
        {
            "sharelora": _batches(lambda s: mine(ids[s], mask[s], user_ids=row_users[s])),
            "peft": _batches(
                lambda s: theirs(input_ids=ids[s], attention_mask=mask[s], adapter_names=names[s])
            ),
            "backbone": _batches(lambda s: base(input_ids=ids[s], attention_mask=mask[s])),
        },
        rounds,
    )
    return {
        "rows_per_s": {k: ROWS / v for k, v in seconds.items()},
        "speedup": seconds["peft"] / seconds["sharelora"],
        # The adapters' own cost: each forward minus the frozen backbone's, timed in turns.
        "adapter_seconds": {k: seconds[k] - seconds["backbone"] for k in ("sharelora", "peft")},
        "build_seconds": {"sharelora": mine_built, "peft": theirs_built},
        "adapter_bytes": {"sharelora": mine_bytes, "peft": theirs_bytes},
    }


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--users", default="1,8,64,512")
    args = p.parse_args()
    rounds = 2 if args.quick else 5
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30522, (ROWS, LENGTH), generator=g)
    mask = torch.ones_like(ids)
    base, _ = minilm()
    base.eval()
    rows, results = [], {}
    for users in map(int, args.users.split(",")):
        r = results[users] = measure(users, ids, mask, base, rounds)
        rows.append([
            users, r["rows_per_s"]["sharelora"], r["rows_per_s"]["peft"], r["speedup"],
            r["adapter_seconds"]["sharelora"], r["adapter_seconds"]["peft"],
            r["build_seconds"]["sharelora"], r["build_seconds"]["peft"],
            r["adapter_bytes"]["sharelora"] / 2**20, r["adapter_bytes"]["peft"] / 2**20,
        ])  # fmt: skip
        print(f"U={users}: {r['speedup']:.2f}x PEFT", flush=True)
    print(f"{machine()}; MiniLM, {','.join(TARGETS)} in every layer, r={RANK}, {ROWS} rows x "
          f"{LENGTH} tokens, batches of {BATCH}, no gradients")  # fmt: skip
    print(table(["U", "ours rows/s", "PEFT rows/s", "x PEFT", "ours adapter s", "PEFT adapter s",
                 "ours build s", "PEFT build s", "ours MiB", "PEFT MiB"], rows))  # fmt: skip
    first, last = min(results), max(results)
    flat = results[first]["rows_per_s"]["sharelora"] / results[last]["rows_per_s"]["sharelora"]
    print(f"our U={first} rows/s over our U={last}: {flat:.2f}x")
    write_json(args.json, {"machine": machine(), "results": results, "flat": flat})


if __name__ == "__main__":
    main()

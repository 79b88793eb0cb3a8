"""One training step of every method against PEFT LoRA on the same backbone.

Setting: MiniLM, r=8, alpha=16, query+value, 16 pairs (one forward of 32 rows) of 128 tokens,
5 users mixed in every batch, AdamW, CPU fp32. Target: sharelora, core and diag within 1.10x of
PEFT LoRA.

    python benchmarks/overhead.py [--quick] [--json FILE]
"""

from __future__ import annotations

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
from peft import LoraConfig, get_peft_model

from sharelora import METHODS, AdapterConfig, PersonalizedRewardModel, build_optimizer

TARGET = 1.10
USERS = [f"user{i}" for i in range(5)]


def peft_step(batch):
    model, _ = minilm()
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = get_peft_model(model, lora).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    return lambda: bt_step(lambda b: model(**inputs).logits.squeeze(-1), opt, batch)


def sharelora_step(method, batch):
    backbone, tokenizer = minilm()
    model = PersonalizedRewardModel(
        backbone, USERS, AdapterConfig(method=method, rank=8, targets=["query", "value"]), tokenizer
    ).train()
    opt = build_optimizer(model, lr=1e-4)
    return lambda: bt_step(lambda b: model(**b), opt, batch)


def main():
    args = parser(__doc__).parse_args()
    torch.manual_seed(0)
    batch = pair_batch()
    steps = {"peft-lora": peft_step(batch)}
    steps.update({m: sharelora_step(m, batch) for m in METHODS})
    seconds = interleaved_median(steps, rounds=3 if args.quick else 7)
    base = seconds["peft-lora"]
    rows = [
        [
            name,
            s,
            s / base,
            ""
            if name not in ("sharelora", "core", "diag")
            else ("yes" if s / base <= TARGET else "NO"),
        ]
        for name, s in seconds.items()
    ]
    print(f"one training step, MiniLM r=8 query,value, 16 pairs x 128 tokens, 5 users; {machine()}")
    print(table(["method", "seconds/step", "x PEFT LoRA", f"<= {TARGET}x"], rows))
    write_json(
        args.json,
        {
            "setting": "minilm r8 qv 16x128 5 users",
            "machine": machine(),
            "seconds": seconds,
            "ratio": {k: v / base for k, v in seconds.items()},
            "target": TARGET,
        },
    )


if __name__ == "__main__":
    main()

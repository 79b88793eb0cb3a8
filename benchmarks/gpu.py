"""GPU step time: sharelora against PEFT LoRA on a ~1.2B-parameter Llama (random init, bf16,
gradient checkpointing), at 5 and 10,000 users. Called by gpu.sh on a lent GPU.

    python benchmarks/gpu.py [--quick] [--json FILE]
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from common import parser, table, write_json
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, LlamaConfig

from sharelora import AdapterConfig, PersonalizedRewardModel, build_optimizer
from sharelora.users import UserVocab

# Llama-3.2-1B's shape: 16 layers, hidden 2048, 32 heads (8 KV), 1.24B parameters.
CONFIG = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    num_labels=1,
    pad_token_id=0,
)
RANK, TARGETS, PAIRS, LENGTH = 4, ["q_proj", "v_proj"], 8, 512


def backbone():
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForSequenceClassification.from_config(
            LlamaConfig(**CONFIG), dtype=torch.bfloat16
        )
    return model


def timed(step, rounds):
    step()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bt(rewards):
    chosen, rejected = rewards.float().chunk(2)
    return -F.logsigmoid(chosen - rejected).mean()


def seconds_per_step(model, forward, rounds):
    opt = (
        build_optimizer(model, lr=1e-4, sparse_users="auto")
        if hasattr(model, "router")
        else torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    )

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = bt(forward())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, rounds)


def peft_seconds(ids, mask, rounds):
    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, task_type="SEQ_CLS")
    model = get_peft_model(backbone(), lora)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return seconds_per_step(
        model, lambda: model(input_ids=ids, attention_mask=mask).logits.squeeze(-1), rounds
    )


def sharelora_seconds(ids, mask, users, rounds, host_tables=False):
    model = PersonalizedRewardModel(
        backbone(),
        UserVocab(range(users)),
        AdapterConfig(rank=RANK, alpha=2 * RANK, targets=TARGETS),
    )
    if host_tables:  # --user-tables host: tables pinned in host memory, batch rows sent
        model.keep_user_tables_on_host()
    model.gradient_checkpointing_enable()
    model.train()
    user_ids = (torch.arange(2 * PAIRS, device="cuda") % PAIRS) % 5 * (users // 5)
    return seconds_per_step(
        model, lambda: model(input_ids=ids, attention_mask=mask, user_ids=user_ids), rounds
    )


def main():
    args = parser(__doc__).parse_args()
    rounds = 3 if args.quick else 10
    ids = torch.randint(1000, CONFIG["vocab_size"], (2 * PAIRS, LENGTH), device="cuda")
    mask = torch.ones_like(ids)
    results = {"peft-lora": peft_seconds(ids, mask, rounds)}
    torch.cuda.empty_cache()
    for users in (5, 10_000):
        results[f"sharelora, {users} users"] = sharelora_seconds(ids, mask, users, rounds)
        torch.cuda.empty_cache()
    results["sharelora, 10000 users, host tables"] = sharelora_seconds(
        ids, mask, 10_000, rounds, host_tables=True
    )
    torch.cuda.empty_cache()
    base = results["peft-lora"]
    tokens = 2 * PAIRS * LENGTH
    rows = [[k, v, v / base, tokens / v] for k, v in results.items()]
    print(
        f"{torch.cuda.get_device_name()}: Llama 1.2B bf16, r={RANK} {','.join(TARGETS)}, "
        f"{PAIRS} pairs x {LENGTH} tokens, gradient checkpointing"
    )
    print(table(["run", "seconds/step", "x PEFT LoRA", "tokens/s"], rows))
    write_json(
        args.json,
        {
            "device": torch.cuda.get_device_name(),
            "seconds": results,
            "ratio": {k: v / base for k, v in results.items()},
            "tokens_per_second": {k: tokens / v for k, v in results.items()},
        },
    )


if __name__ == "__main__":
    main()

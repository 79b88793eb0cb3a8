"""Tiny random models for every supported architecture (PEFT-style test table)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    GPTJConfig,
    LlamaConfig,
)

VOCAB = 64
PAD = 0

TINY_CONFIGS = {
    "bert": lambda: BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=1,
        pad_token_id=PAD,
    ),
    "llama": lambda: LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        num_labels=1,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=1,
    ),
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=64,
        num_labels=1,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=1,
    ),
    "gptj": lambda: GPTJConfig(
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=64,
        rotary_dim=4,
        num_labels=1,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=1,
    ),
}
ARCHS = list(TINY_CONFIGS)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """A saved tiny random backbone per architecture: {arch: directory}."""
    dirs = {}
    for arch, make in TINY_CONFIGS.items():
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(make())
        d = tmp_path_factory.mktemp(arch)
        model.save_pretrained(d)
        dirs[arch] = str(d)
    return dirs


def tiny_batch(batch: int = 6, length: int = 9, seed: int = 0):
    """Token ids with right padding of varying length, and the mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        keep = length - (row % 3)
        ids[row, keep:] = PAD
        mask[row, keep:] = 0
    return ids, mask


def randomize(model, seed: int = 0, scale: float = 0.3) -> None:
    """Fill every trainable tensor with noise so that each user's ΔW differs and is non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def save_text_backbone(directory, **config) -> str:
    """A tiny random BERT with the real MiniLM tokenizer: text in, fast on CPU."""
    from transformers import AutoTokenizer

    from sharelora.backbone import resolve_backbone

    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("minilm"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=1,
        **config,
    )
    AutoModelForSequenceClassification.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_text_backbone(tmp_path_factory):
    return save_text_backbone(tmp_path_factory.mktemp("tiny-text"))


# `python` + these runs a script on two processes. With accelerate 1.15, `--cpu
# --num_processes 2` starts one; `--multi_gpu` on a machine without GPUs starts one CPU process
# per rank on gloo (torchrun underneath).
LAUNCH_TWO = [
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    *("--num_processes", "2", "--num_machines", "1"),
    *("--mixed_precision", "no", "--dynamo_backend", "no"),
]


def opposite_tastes(n_per_user: int = 40, seed: int = 0):
    """Learnable data: 'sunny' prefers replies with 'yes', 'rainy' replies with 'no'."""
    import random

    from sharelora.data import Comparison

    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "lamp", "train", "book", "tree"]
    rows = []
    for i in range(n_per_user):
        for user, good, bad in (("sunny", "yes", "no"), ("rainy", "no", "yes")):
            a, b = rng.sample(words, 2)
            rows.append(Comparison(f"question {i}?", f"{good} {a} {b}", f"{bad} {b} {a}", user))
    return rows

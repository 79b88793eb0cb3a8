"""The last block at position 0 only gives the full forward's rewards and gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CONFIGS, tiny_batch
from transformers import AutoModelForSequenceClassification, BertModel, RobertaConfig

from sharelora import AdapterConfig, PersonalizedRewardModel
from sharelora.pooled import first_token_block, first_token_only


def _roberta_dir(tmp_path) -> str:
    """The tiny BERT's sizes in RoBERTa's body and classification head."""
    sizes = TINY_CONFIGS["bert"]().to_diff_dict()
    config = RobertaConfig(**{k: v for k, v in sizes.items() if k != "model_type"})
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    return str(tmp_path)


def _personal(directory: str, attention: str, top_layers: int | None):
    torch.manual_seed(0)
    model = PersonalizedRewardModel.from_backbone(
        directory, ["a", "b"], AdapterConfig(rank=2, top_layers=top_layers)
    ).eval()
    model.backbone.set_attn_implementation(attention)
    for p in model.user_parameters():
        torch.nn.init.normal_(p)
    for p in model.shared_parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # boolean and additive masks
@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("top_layers", [None, 1])
def test_first_token_block_equals_full_block(tiny_dirs, tmp_path, arch, attention, top_layers):
    directory = tiny_dirs["bert"] if arch == "bert" else _roberta_dir(tmp_path)
    model = _personal(directory, attention, top_layers)
    block = first_token_block(model.backbone)
    assert block is not None
    ids, mask = tiny_batch(batch=6)  # right padding of three lengths
    users = torch.tensor([0, 1, 1, 0, 1, 0])
    outs, grads = [], []
    for first in (None, block):
        model.zero_grad()
        with first_token_only(first):
            out = model(input_ids=ids, attention_mask=mask, user_ids=users)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    # Different shapes of the same products (one token against T): equal to float rounding.
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    assert "forward" not in vars(block)  # the block's own forward is back


def test_first_token_only_restores_the_block_after_an_error(tiny_dirs):
    model = _personal(tiny_dirs["bert"], "sdpa", None)
    block = first_token_block(model.backbone)
    with pytest.raises(ValueError, match="user_ids"), first_token_only(block):
        model(input_ids=torch.ones(2, 3, dtype=torch.long))  # personalized: needs user ids
    assert "forward" not in vars(block)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gptj"])
def test_models_that_read_another_position_keep_the_full_block(tiny_dirs, arch):
    # Decoders score the last real token, whose position varies by row.
    backbone = AutoModelForSequenceClassification.from_pretrained(tiny_dirs[arch])
    assert first_token_block(backbone) is None
    with first_token_only(None):
        pass  # nothing to change


def test_a_bert_body_without_the_classification_head_keeps_the_full_block(tiny_dirs):
    # A custom head on the same body may pool otherwise: only the known classes qualify.
    assert first_token_block(BertModel.from_pretrained(tiny_dirs["bert"])) is None

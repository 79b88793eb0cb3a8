"""Run the last transformer block at the one position the score head reads.

A BERT-style reward model scores a text from the last block's output at position 0 (BERT's
pooler and RoBERTa's classification head both read ``[:, 0]``); the block's output at every
other position is computed and thrown away. At that position the block needs the query of
token 0 only, with keys and values of every token::

    h [B, T, d] ─► key, value (every token) ──────────────┐
    h[:, :1] [B, 1, d] ─► query ─► attention over T ◄─────┘ ─► attention output ─► FFN ─► [B, 1, d]

so the output projection, the feed-forward block and the attention scores run on one token
instead of ``T``. With adapters only in the top block and the blocks below cached
(``sharelora.prefix``), that block is all a step computes, and this cuts it several times.

The result at position 0 is the block's own (same modules, same attention implementation,
dropout included in training), so rewards equal the full forward's to float rounding; the
tests check it against the full block, gradients included. Architectures not known to read
position 0 keep the full block.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import eager_attention_forward

from .inject import transformer_blocks

# Sequence-classification models whose head reads the last block at position 0 only (a custom
# head on the same body may pool otherwise, so the check is on the class, not the model type).
READS_FIRST_TOKEN = (
    "BertForSequenceClassification",
    "RobertaForSequenceClassification",
    "XLMRobertaForSequenceClassification",
)
_SELF_ATTENTION = ("query", "key", "value", "attention_head_size", "scaling", "dropout", "config")


def first_token_block(backbone: nn.Module) -> nn.Module | None:
    """The backbone's last block when its score reads that block at position 0 only and the
    block is a BERT-style encoder layer (self-attention, attention output, feed-forward);
    ``None`` otherwise (the full block then runs)."""
    if type(backbone).__name__ not in READS_FIRST_TOKEN:
        return None
    block = transformer_blocks(backbone)[1][-1]
    attention = getattr(block, "attention", None)
    self_attention = getattr(attention, "self", None)
    bert_style = (
        all(hasattr(self_attention, a) for a in _SELF_ATTENTION)
        and hasattr(attention, "output")
        and hasattr(block, "feed_forward_chunk")
    )
    if (
        not bert_style
        or getattr(block, "is_decoder", True)
        or getattr(block, "add_cross_attention", True)
    ):
        return None
    return block


def _first_token_forward(
    block: nn.Module, hidden_states: torch.Tensor, attention_mask=None, *_, **__
) -> torch.Tensor:
    """The block's output at position 0 ``[B, 1, d]`` from its input ``[B, T, d]``."""
    attn = block.attention.self
    b, t, _ = hidden_states.shape
    first = hidden_states[:, :1]  # [B, 1, d]

    def heads(x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(b, n, -1, attn.attention_head_size).transpose(1, 2)  # [B, H, n, hd]

    query = heads(attn.query(first), 1)
    key, value = heads(attn.key(hidden_states), t), heads(attn.value(hidden_states), t)
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[2] > 1:
        attention_mask = attention_mask[:, :, :1]  # position 0's query row: [B, 1, 1, T]
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(
        attn.config._attn_implementation, eager_attention_forward
    )
    context, _ = attend(
        attn,
        query,
        key,
        value,
        attention_mask,
        dropout=attn.dropout.p if attn.training else 0.0,
        scaling=attn.scaling,
    )  # [B, 1, H, hd]
    context = context.reshape(b, 1, -1)  # [B, 1, d]
    return block.feed_forward_chunk(block.attention.output(context, first))


@contextlib.contextmanager
def first_token_only(block: nn.Module | None):
    """Within the block, ``block`` (from ``first_token_block``; ``None``: nothing changes)
    computes position 0 only and returns ``[B, 1, d]``."""
    if block is None:
        yield
        return
    block.forward = functools.partial(_first_token_forward, block)
    try:
        yield
    finally:
        del block.forward

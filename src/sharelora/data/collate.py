"""Tokenization and batching: chosen and rejected become one batch of ``2*B`` rows.

Truncation rule (the same for chosen and rejected): the response is kept whole and the prompt
is cut from the *left*, keeping the end of the prompt, nearest the response. Only a response
that alone exceeds the budget loses its end.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from ..users import UserVocab
from .records import Comparison


def feature_rows(features: dict[str, list]) -> list[dict]:
    """Column lists (as a tokenizer returns them) -> one dict per row (as ``pad`` takes them)."""
    return [
        dict(zip(features, values, strict=True)) for values in zip(*features.values(), strict=True)
    ]


class PairTokenizer:
    """Encodes ``(prompt, response)`` within ``max_length`` tokens, counting truncations.

    Args:
        tokenizer: a fast transformers tokenizer (offsets are used to cut at token boundaries).
        max_length: total token budget including special tokens.
    """

    def __init__(self, tokenizer, max_length: int):
        if tokenizer is None:
            raise ValueError("this model has no tokenizer; build it from a backbone that has one")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("a fast (Rust) tokenizer is needed to cut texts at token boundaries")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncated = 0

    def pad(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Pad token rows into tensors, always on the right: cached prefix states are laid out
        by position, and a left pad would shift the positions of a text's tokens."""
        return self.tokenizer.pad(rows, return_tensors="pt", padding_side="right")

    def _cut(self, prompts: list[str], responses: list[str]) -> tuple[list[str], list[str]]:
        """Texts cut at token boundaries so that the pair fits ``max_length``."""
        tok = self.tokenizer
        enc_p = tok(prompts, add_special_tokens=False, return_offsets_mapping=True)
        enc_r = tok(responses, add_special_tokens=False, return_offsets_mapping=True)
        out_p, out_r = [], []
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            offs_p, offs_r = enc_p["offset_mapping"][i], enc_r["offset_mapping"][i]
            budget = self.max_length - tok.num_special_tokens_to_add(pair=bool(p))
            if len(offs_r) > budget:
                r = r[: offs_r[budget - 1][1]] if budget > 0 else ""
                p = ""
                self.truncated += 1
            elif len(offs_p) + len(offs_r) > budget:
                keep = budget - len(offs_r)
                p = p[offs_p[len(offs_p) - keep][0] :] if keep > 0 else ""
                self.truncated += 1
            out_p.append(p)
            out_r.append(r)
        return out_p, out_r

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, list]:
        """Token ids (no padding) for each pair: ``{"input_ids": [...], ...}``.

        Pair encoding gives encoders their ``[SEP]`` and segment ids; a row with an empty prompt
        is encoded as a single sequence.
        """
        prompts, responses = self._cut(list(prompts), list(responses))
        with_prompt = [i for i, p in enumerate(prompts) if p]
        without = [i for i, p in enumerate(prompts) if not p]
        kw = {"truncation": True, "max_length": self.max_length}
        out: dict[str, list] = {}
        for idx, enc in (
            (
                with_prompt,
                with_prompt
                and self.tokenizer(
                    [prompts[i] for i in with_prompt], [responses[i] for i in with_prompt], **kw
                ),
            ),
            (without, without and self.tokenizer([responses[i] for i in without], **kw)),
        ):
            for key in enc or {}:
                column = out.setdefault(key, [None] * len(prompts))
                for i, value in zip(idx, enc[key], strict=True):
                    column[i] = value
        return out


class PairDataset(Dataset):
    """Comparisons pre-tokenized once: item ``i`` is ``(chosen features, rejected features,
    user id)``."""

    def __init__(self, data: list[Comparison], users: UserVocab, encoder: PairTokenizer):
        self.user_ids = users.encode([c.user for c in data]).tolist()
        prompts = [c.prompt for c in data]
        self.chosen = encoder(prompts, [c.chosen for c in data])
        self.rejected = encoder(prompts, [c.rejected for c in data])
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.user_ids)

    def lengths(self) -> list[int]:
        """Longer of the two sides per pair, for length-grouped sampling."""
        return [
            max(len(a), len(b))
            for a, b in zip(self.chosen["input_ids"], self.rejected["input_ids"], strict=True)
        ]

    def __getitem__(self, i: int) -> tuple[dict, dict, int, int]:
        return (
            {k: v[i] for k, v in self.chosen.items()},
            {k: v[i] for k, v in self.rejected.items()},
            self.user_ids[i],
            i,
        )

    def collate(self, items: list[tuple[dict, dict, int, int]]) -> dict[str, torch.Tensor]:
        """``2*B`` rows: chosen ``[0, B)``, rejected ``[B, 2B)``, user ids repeated; ``index``
        ``[B]`` gives each pair's position in the dataset."""
        rows = [item[0] for item in items] + [item[1] for item in items]
        batch = dict(self.encoder.pad(rows))
        ids = torch.tensor([item[2] for item in items], dtype=torch.long)
        batch["user_ids"] = torch.cat([ids, ids])
        batch["index"] = torch.tensor([item[3] for item in items], dtype=torch.long)
        return batch

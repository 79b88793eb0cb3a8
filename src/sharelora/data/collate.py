"""Tokenization and batching: chosen and rejected become one batch of ``2*B`` rows.

Truncation rule (the same for chosen and rejected): the response is kept whole and the prompt
is cut from the *left*, keeping the end of the prompt, nearest the response. Only a response
that alone exceeds the budget loses its end.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from ..render import Rendered, render
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
        self.truncated = 0  # rows cut so far
        self.last_truncated: list[bool] = []  # which rows of the last call were cut

    def pad(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Pad token rows into tensors, always on the right: cached prefix states are laid out
        by position, and a left pad would shift the positions of a text's tokens."""
        return self.tokenizer.pad(rows, return_tensors="pt", padding_side="right")

    def _cut(self, rows: list[Rendered]) -> list[tuple[str, str]]:
        """Texts cut at token boundaries so that each row fits ``max_length``; records in
        ``last_truncated`` which rows were cut."""
        tok = self.tokenizer
        enc_p = tok([r.prompt for r in rows], add_special_tokens=False, return_offsets_mapping=True)
        enc_r = tok(
            [r.response for r in rows], add_special_tokens=False, return_offsets_mapping=True
        )
        out, self.last_truncated = [], []
        for i, row in enumerate(rows):
            p, r = row.prompt, row.response
            offs_p, offs_r = enc_p["offset_mapping"][i], enc_r["offset_mapping"][i]
            special = 0 if row.templated else tok.num_special_tokens_to_add(pair=bool(p))
            budget = self.max_length - special
            cut = True
            if len(offs_r) > budget:
                r = r[: offs_r[budget - 1][1]] if budget > 0 else ""
                p = ""
            elif len(offs_p) + len(offs_r) > budget:
                keep = budget - len(offs_r)
                p = p[offs_p[len(offs_p) - keep][0] :] if keep > 0 else ""
            else:
                cut = False
            self.truncated += cut
            self.last_truncated.append(cut)
            out.append((p, r))
        return out

    def __call__(self, prompts: Sequence, responses: Sequence) -> dict[str, list]:
        """Token ids (no padding) for each row: ``{"input_ids": [...], ...}``.

        Each ``(prompt, response)`` goes through ``sharelora.render.render`` first. Plain text
        pairs are encoded as text pairs (encoders get their ``[SEP]`` and segment ids; an empty
        prompt gives a single sequence); chat-template text is encoded as one sequence with no
        special tokens added (the template holds them).
        """
        rendered = [render(p, r, self.tokenizer) for p, r in zip(prompts, responses, strict=True)]
        texts = self._cut(rendered)
        groups: dict[str, list[int]] = {"pair": [], "single": [], "templated": []}
        for i, (row, (prompt, _)) in enumerate(zip(rendered, texts, strict=True)):
            groups["templated" if row.templated else "pair" if prompt else "single"].append(i)
        out: dict[str, list] = {}
        for kind, idx in groups.items():
            if not idx:
                continue
            kw = {"truncation": True, "max_length": self.max_length}
            if kind == "templated":
                kw["add_special_tokens"] = False
            if kind == "pair":
                enc = self.tokenizer([texts[i][0] for i in idx], [texts[i][1] for i in idx], **kw)
            else:
                enc = self.tokenizer([texts[i][0] + texts[i][1] for i in idx], **kw)
            for key in enc:
                column = out.setdefault(key, [None] * len(texts))
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

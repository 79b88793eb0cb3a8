"""Cache the frozen lower blocks: hidden states entering the first adapted block, once per text.

With adapters only in the top k blocks (``AdapterConfig.top_layers``), everything below depends
on the text alone. Computing it once and reusing it every epoch (and for every method that
shares the backbone) leaves each step the cost of the top k blocks::

    tokens ─► embeddings ─► [block 0 … block f-1] ─► block f … block L-1 ─► head
                             computed once (eval       adapted; run every step
                             mode), stored per text

Inside ``use(hidden)`` the lower blocks are swapped for pass-through modules and the last of them
returns the cached states, so the model's own forward still builds masks, positions and the head:
no per-architecture code. The cached prefix runs without dropout (it is frozen; in eval mode the
cached and uncached paths agree to float rounding, which the tests check).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .data.collate import feature_rows
from .inject import block_of, transformer_blocks


class _Stop(Exception):
    pass


class _PassThrough(nn.Module):
    """Stands in for a skipped block: returns its input, or the cached states if ``hidden``."""

    def __init__(self, tuple_len: int, hidden: torch.Tensor | None = None):
        super().__init__()
        self.tuple_len = tuple_len
        self.hidden = hidden

    def forward(self, hidden_states=None, *args, **kwargs):
        h = self.hidden if self.hidden is not None else hidden_states
        return h if self.tuple_len == 0 else (h,) + (None,) * (self.tuple_len - 1)


class PrefixCache:
    """Per-text hidden states entering the first adapted block of ``model``.

    Args:
        model: a ``PersonalizedRewardModel`` whose adapters sit in the top blocks only.
        store: another cache over the *same backbone* whose states to share (the states depend
            on the text and the frozen blocks only, so every method trained on one backbone
            can reuse them).
    """

    def __init__(self, model, store: PrefixCache | None = None):
        self.model = model
        path, self.blocks = transformer_blocks(model.backbone)
        adapted = [
            block_of(n, path)
            for n, layer in model.adapter_layers.items()
            if not layer.is_head  # the head runs after the blocks anyway
        ]
        if any(i is None for i in adapted):
            raise ValueError("a prefix cache needs every adapter inside the transformer blocks")
        self.first = min(adapted)
        if self.first == 0:
            raise ValueError("adapters start in block 0: there is no frozen prefix to cache")
        self.states: list[torch.Tensor] = []  # one [T_i, d] tensor per unique text
        self._index: dict[tuple[int, ...], int] = {}
        self._tuple_len = 0
        if store is not None:
            if store.first != self.first:
                raise ValueError(
                    f"cannot share a prefix cache of block {store.first} with adapters that "
                    f"start at block {self.first}"
                )
            self.states, self._index, self._tuple_len = (
                store.states,
                store._index,
                store._tuple_len,
            )

    def __len__(self) -> int:
        return len(self.states)

    def _capture(self, batch: dict) -> torch.Tensor:
        """Run the backbone up to the first adapted block and return its input ``[B, T, d]``."""
        seen = {}

        def grab(module, args, kwargs):
            seen["h"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            raise _Stop

        def shape(module, args, output):
            self._tuple_len = len(output) if isinstance(output, tuple) else 0

        hooks = [
            self.blocks[self.first].register_forward_pre_hook(grab, with_kwargs=True),
            self.blocks[self.first - 1].register_forward_hook(shape),
        ]
        try:
            with contextlib.suppress(_Stop):
                self.model.backbone(**batch)
        finally:
            for h in hooks:
                h.remove()
        return seen["h"]

    @torch.no_grad()
    def add(
        self, features: dict[str, list], pad, batch_size: int = 64, progress: bool = True
    ) -> list[int]:
        """Cache the texts of ``features`` (token lists, as ``PairTokenizer`` gives them) that
        are not cached yet; returns each row's index into ``states``."""
        rows = feature_rows(features)
        keys = [tuple(r["input_ids"]) for r in rows]
        todo = sorted(
            {k: i for i, k in enumerate(keys) if k not in self._index}.values(),
            key=lambda i: len(keys[i]),
        )
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        try:
            for start in tqdm(
                range(0, len(todo), batch_size),
                desc="caching frozen blocks",
                disable=not progress or not todo,
                leave=False,
            ):
                chunk = todo[start : start + batch_size]
                batch = {k: v.to(device) for k, v in pad([rows[i] for i in chunk]).items()}
                hidden = self._capture(batch)
                for j, i in enumerate(chunk):
                    mask = batch["attention_mask"][j].bool()
                    self._index[keys[i]] = len(self.states)
                    self.states.append(hidden[j][mask].detach().clone())
        finally:
            self.model.train(was_training)
        return [self._index[k] for k in keys]

    def batch(self, indices: list[int], attention_mask: torch.Tensor) -> torch.Tensor:
        """Cached states laid out like ``attention_mask`` ``[B, T]`` (either padding side)."""
        states = torch.cat([self.states[i] for i in indices])  # [sum T_i, d]
        out = states.new_zeros(*attention_mask.shape, states.shape[-1])  # [B, T, d]
        # A boolean index walks the mask row by row, in the order the rows' states were
        # concatenated, so one scatter lays out every row (either padding side).
        out[attention_mask.bool()] = states
        return out

    @contextlib.contextmanager
    def use(self, hidden: torch.Tensor):
        """Within the block, the backbone skips the prefix and starts from ``hidden``."""
        originals = [self.blocks[i] for i in range(self.first)]
        try:
            for i in range(self.first):
                last = i == self.first - 1
                self.blocks[i] = _PassThrough(self._tuple_len, hidden if last else None)
            yield
        finally:
            for i, block in enumerate(originals):
                self.blocks[i] = block

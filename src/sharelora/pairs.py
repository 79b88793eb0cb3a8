"""Pair batches through the model: rewards, the Bradley-Terry loss, and the frozen-prefix
cache's bookkeeping, shared by training and evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .data import PairDataset, PairTokenizer
from .pooled import first_token_block, first_token_only
from .prefix import PrefixCache


def pair_rewards(model, batch: dict, cache=None, indices=None, first_token=None) -> torch.Tensor:
    """Rewards ``[rows]`` for a collated batch (a pair batch: chosen rows first), through the
    prefix cache when one is given (``indices``: each row's cached-state index), with the last
    block at position 0 only when ``first_token`` is that block (``sharelora.pooled``)."""
    inputs = {k: v for k, v in batch.items() if k not in ("index", "cache_index")}
    with first_token_only(first_token):
        if cache is None:
            return model(**inputs)
        hidden = cache.batch(indices, inputs["attention_mask"])
        with cache.use(hidden):
            return model(**inputs)


def bt_loss(rewards: torch.Tensor) -> torch.Tensor:
    """``-log σ(r+ − r−)`` per pair, from ``[2B]`` rewards (chosen first)."""
    chosen, rejected = rewards.chunk(2)
    return -F.logsigmoid(chosen - rejected)


def pair_correct(margins: torch.Tensor) -> torch.Tensor:
    """Per-pair credit from margins ``r+ − r−``: 1 if right, ½ for a tie, 0 if wrong. The one
    accuracy rule of training logs and of ``metrics.json``."""
    return (margins > 0).float() + 0.5 * (margins == 0).float()


class DistinctRows(Dataset):
    """The distinct ``(user, text)`` rows of a ``PairDataset``; pair ``i`` compares rows
    ``chosen[i]`` and ``rejected[i]``.

    Evaluation scores each distinct row once per pass and maps the rewards back to pairs: UKP
    reuses each argument in many pairs, Jester has 140 jokes under 125,751 pairs. With
    ``share_users`` (a model whose reward ignores the user, or the shared warm-up) a text is one
    row for every user.
    """

    def __init__(self, ds: PairDataset, share_users: bool, cache_index=None):
        self.encoder = ds.encoder
        self.features: list[dict] = []
        self.user_ids: list[int] = []
        self.cache_index: list[int] = []
        self.chosen: list[int] = []
        self.rejected: list[int] = []
        seen: dict[tuple, int] = {}
        sides = ((ds.chosen, self.chosen, 0), (ds.rejected, self.rejected, 1))
        for i in range(len(ds)):
            user = 0 if share_users else ds.user_ids[i]
            for features, out, side in sides:
                row = {k: v[i] for k, v in features.items()}
                key = (user, *(tuple(v) for v in row.values()))
                if key not in seen:
                    seen[key] = len(self.features)
                    self.features.append(row)
                    self.user_ids.append(user)
                    self.cache_index.append(cache_index[side][i] if cache_index else -1)
                out.append(seen[key])

    def __len__(self) -> int:
        return len(self.features)

    def lengths(self) -> list[int]:
        return [len(f["input_ids"]) for f in self.features]

    def __getitem__(self, j: int) -> int:
        return j

    def collate(self, rows: list[int]) -> dict[str, torch.Tensor]:
        batch = dict(self.encoder.pad([self.features[j] for j in rows]))
        batch["user_ids"] = torch.tensor([self.user_ids[j] for j in rows], dtype=torch.long)
        batch["cache_index"] = torch.tensor([self.cache_index[j] for j in rows], dtype=torch.long)
        batch["index"] = torch.tensor(rows, dtype=torch.long)
        return batch


class PairRun:
    """Pair datasets, the prefix cache and its per-row indices, shared by training and
    evaluation passes over the same model.

    Args:
        model: the ``PersonalizedRewardModel`` (its tokenizer and users encode the data).
        train_data, val_data: comparisons (either may be ``None``).
        max_length: token budget for prompt + response.
        cache: a ``PrefixCache`` over ``model``; every text is cached once here.
        progress: show the caching progress bar.
    """

    def __init__(
        self,
        model,
        train_data,
        val_data,
        max_length: int,
        cache: PrefixCache | None,
        progress: bool = True,
    ):
        encoder = PairTokenizer(model.tokenizer, max_length)
        self.train = PairDataset(train_data, model.users, encoder) if train_data else None
        self.val = PairDataset(val_data, model.users, encoder) if val_data else None
        self.cache = cache
        self.first_token = first_token_block(model.backbone)  # None: the full last block
        self.index: dict[int, tuple[list[int], list[int]]] = {}
        self._distinct: dict[tuple[int, bool], DistinctRows] = {}
        if cache is not None:
            for ds in filter(None, (self.train, self.val)):
                chosen = cache.add(ds.chosen, encoder.pad, progress=progress)
                rejected = cache.add(ds.rejected, encoder.pad, progress=progress)
                self.index[id(ds)] = (chosen, rejected)
        self.truncated = encoder.truncated

    def rewards(
        self, model, ds: PairDataset, batch: dict, share_users: bool = False
    ) -> torch.Tensor:
        """Rewards ``[2B]`` for a batch of ``ds`` (through the cache when there is one).

        With the cache, a row that repeats an earlier row of the batch (same text and user;
        any user when ``share_users``: a reward that ignores the user) is not run again: the
        distinct rows go through the model once and their rewards are gathered back, so the
        gradient is the same sum over every row.
        """
        if self.cache is None:
            return pair_rewards(model, batch, first_token=self.first_token)
        chosen, rejected = self.index[id(ds)]
        pos = batch["index"].tolist()
        indices = [chosen[i] for i in pos] + [rejected[i] for i in pos]  # [2B] cache rows
        users = [0] * len(indices) if share_users else batch["user_ids"].tolist()
        first: dict[tuple[int, int], int] = {}
        kept, inverse = [], []  # [D] first row of each distinct key; [2B] its position
        for r, key in enumerate(zip(users, indices, strict=True)):
            if key not in first:
                first[key] = len(kept)
                kept.append(r)
            inverse.append(first[key])
        if len(kept) == len(indices):
            return pair_rewards(model, batch, self.cache, indices, self.first_token)
        rows = torch.tensor(kept, device=batch["input_ids"].device)
        sub = {k: v.index_select(0, rows) for k, v in batch.items() if k != "index"}
        kept_indices = [indices[r] for r in kept]
        distinct = pair_rewards(model, sub, self.cache, kept_indices, self.first_token)  # [D]
        return distinct[torch.tensor(inverse, device=distinct.device)]

    def distinct_rows(self, ds: PairDataset, share_users: bool) -> DistinctRows:
        """The distinct rows of ``ds`` (built once per dataset and routing)."""
        key = (id(ds), share_users)
        if key not in self._distinct:
            self._distinct[key] = DistinctRows(ds, share_users, self.index.get(id(ds)))
        return self._distinct[key]

    def row_rewards(self, model, batch: dict) -> torch.Tensor:
        """Rewards ``[B]`` for a batch of distinct rows."""
        indices = batch["cache_index"].tolist() if self.cache is not None else None
        return pair_rewards(model, batch, self.cache, indices, self.first_token)

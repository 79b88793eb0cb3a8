"""Pair batches through the model: rewards, the Bradley-Terry loss, and the frozen-prefix
cache's bookkeeping, shared by training and evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import PairDataset, PairTokenizer
from .prefix import PrefixCache


def pair_rewards(model, batch: dict, cache=None, indices=None) -> torch.Tensor:
    """Rewards ``[2B]`` for a collated pair batch (chosen rows first), through the prefix cache
    when one is given (``indices``: each row's cached-state index)."""
    inputs = {k: v for k, v in batch.items() if k != "index"}
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
        self.index: dict[int, tuple[list[int], list[int]]] = {}
        if cache is not None:
            for ds in filter(None, (self.train, self.val)):
                chosen = cache.add(ds.chosen, encoder.pad, progress=progress)
                rejected = cache.add(ds.rejected, encoder.pad, progress=progress)
                self.index[id(ds)] = (chosen, rejected)
        self.truncated = encoder.truncated

    def rewards(self, model, ds: PairDataset, batch: dict) -> torch.Tensor:
        """Rewards ``[2B]`` for a batch of ``ds`` (through the cache when there is one)."""
        if self.cache is None:
            return pair_rewards(model, batch)
        chosen, rejected = self.index[id(ds)]
        pos = batch["index"].tolist()
        return pair_rewards(
            model, batch, self.cache, [chosen[i] for i in pos] + [rejected[i] for i in pos]
        )

"""Which pairs each training step sees: the epoch's order over every pair (seeded, grouped by
length on request), through a ``DataLoader`` in one process, or as each process's share of the
same global batches when the users are sharded (``sharelora.shard``).

Both start mid-epoch after a resume without collating the batches they skip.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch.utils.data import DataLoader
from transformers.trainer_pt_utils import LengthGroupedSampler

from .config import TrainConfig

__all__ = ["epoch_batches", "epoch_order"]


def epoch_order(n: int, lengths, cfg: TrainConfig, epoch: int) -> list[int]:
    """This epoch's order of ``n`` pairs (``lengths()``: theirs, read only to group them)."""
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    if cfg.group_by_length:
        return list(LengthGroupedSampler(cfg.batch_size, lengths=lengths(), generator=g))
    return torch.randperm(n, generator=g).tolist()


def epoch_batches(ds, cfg: TrainConfig, acc, epoch: int, skip: int, sharded=None):
    """``(batches, total)``: this epoch's ``(batch, loss factor)`` after the first ``skip``,
    and how many the epoch holds. The factor is ``None`` but when sharded.

    ``sharded``: ``(shard, positions, total pairs, lengths of every pair or None)``: where this
    process's pairs of ``ds`` sit among every process's (``Trainer.positions``).
    """
    if sharded is not None:
        return _shard_batches(ds, cfg, acc, epoch, skip, *sharded)
    loader = acc.prepare(
        DataLoader(
            ds,
            batch_size=cfg.batch_size,
            sampler=epoch_order(len(ds), ds.lengths, cfg, epoch),
            collate_fn=ds.collate,
            # A DataLoader draws its seed from the global RNG unless it has its own
            # generator; that draw would shift the dropout stream after a resume.
            generator=torch.Generator().manual_seed(0),
        )
    )
    skipped = acc.skip_first_batches(loader, skip) if skip else loader
    return ((batch, None) for batch in skipped), len(loader)


def _shard_batches(ds, cfg, acc, epoch, skip, shard, positions, total, lengths):
    """The global batches of every pair, each as this process's share of it, with the factor
    that makes DDP's average the global mean (``Shard.loss_factor``)."""
    order = epoch_order(total, lambda: lengths, cfg, epoch)
    shares = shard.local_batches(order, positions, cfg.batch_size)

    def batches():
        for local, size in itertools.islice(shares, skip, None):
            batch = ds.collate([ds[i] for i in local or [0]])
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            yield batch, shard.loss_factor(local and len(local), size)

    return batches(), math.ceil(total / cfg.batch_size)

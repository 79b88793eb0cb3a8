"""Optimizer and schedule: shared factors + head with weight decay, user tables without."""

from __future__ import annotations

import torch
from transformers import get_scheduler

SCHEDULES = ("linear", "cosine", "constant")


def build_optimizer(
    model, lr: float = 1e-3, weight_decay: float = 0.0, user_lr: float | None = None
) -> torch.optim.Optimizer:
    """AdamW over two groups: shared parameters (``weight_decay``) and per-user tables (none).

    Decay on a user table would shrink every user's row at each step, including users absent
    from the batch; so user tables never decay.
    """
    groups = [{"params": model.shared_parameters(), "weight_decay": weight_decay, "name": "shared"}]
    users = model.user_parameters()
    if users:
        groups.append({"params": users, "weight_decay": 0.0, "lr": user_lr or lr, "name": "users"})
    return torch.optim.AdamW(groups, lr=lr)


def build_scheduler(
    optimizer, total_steps: int, warmup_ratio: float = 0.1, schedule: str = "linear"
):
    """Linear warm-up over ``warmup_ratio`` of the steps, then linear/cosine decay (or none)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    name = "constant_with_warmup" if schedule == "constant" else schedule
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=int(warmup_ratio * total_steps),
        num_training_steps=max(total_steps, 1),
    )

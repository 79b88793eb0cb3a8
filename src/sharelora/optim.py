"""Optimizer and schedule: AdamW for shared factors and the head, lazy row-wise Adam for user
tables.

Per-user tables (``model.user_parameters()``, first dim = user) never get weight decay: decay,
like momentum, would move users who are not in the batch.

With row-sparse gradients (``sparse_users``) the user tables are updated lazily: only the rows
of users in the batch change, and each row's bias correction counts that row's own updates.
Dense Adam instead keeps moving an absent user's row by its decaying momentum ``m`` and decays
its ``v``. The two agree exactly when every user is in every batch; with many users and small
batches the lazy update costs O(users in the batch) instead of O(all users) per step.
"""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from .config import SCHEDULES, SPARSE_USERS, SPARSE_USERS_THRESHOLD, USER_LR_SCALE, USER_STATES


class PersonalAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose ``lazy`` parameter groups take row-sparse gradients.

    Args:
        params: parameter groups; a group with ``lazy=True`` holds per-user tables ``[N, ...]``.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "lazy": False,
            "rowwise": False,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["lazy"] and group["weight_decay"]:
                raise ValueError("lazy (per-user) groups take no weight decay")
            if group["rowwise"] and not group["lazy"]:
                raise ValueError("rowwise state is for lazy (per-user) groups")

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    self._init_state(p, state, group)
                if group["rowwise"]:
                    self._rowwise_step(p, state, group, beta2)
                elif p.grad.is_sparse:
                    self._sparse_step(p, state, group, beta1, beta2)
                else:
                    self._dense_step(p, state, group, beta1, beta2)
        return loss

    @staticmethod
    def _init_state(p, state, group) -> None:
        # Lazy groups count steps per row (users are updated at different rates). Integer
        # counts: exact, and no float64 (which MPS lacks).
        shape = (p.shape[0],) if group["lazy"] else ()
        state["step"] = torch.zeros(shape, dtype=torch.int64, device=p.device)
        if group["rowwise"]:
            state["row_sq"] = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
        else:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)

    @staticmethod
    def _rowwise_step(p, state, group, beta2):
        """Row-wise state: one second-moment scalar per row (the EMA of the row's mean squared
        gradient, Adam's bias correction, no momentum), updated for the batch's rows only."""
        if p.grad.is_sparse:
            grad = p.grad.coalesce()
            rows, values = grad.indices()[0], grad.values()  # [k], [k, ...]
        else:
            rows, values = torch.arange(p.shape[0], device=p.device), p.grad
        state["step"][rows] += 1
        mean_sq = values.pow(2).flatten(1).mean(1)  # [k]
        sq = state["row_sq"][rows].mul_(beta2).add_(mean_sq, alpha=1 - beta2)
        state["row_sq"][rows] = sq
        t = state["step"][rows].to(p.dtype)
        bc2 = -torch.expm1(t * math.log(beta2))
        denom = (sq / bc2).sqrt().add_(group["eps"]).reshape((-1,) + (1,) * (p.dim() - 1))
        p[rows] -= group["lr"] * values / denom

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, then every state tensor on its
        parameter's device: torch leaves ``step`` where it was saved (the CPU), and the lazy
        update indexes it with the device's row ids. Float step counts of older checkpoints
        become integers."""
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            for name, value in state.items():
                if isinstance(value, torch.Tensor):
                    dtype = torch.int64 if name == "step" else value.dtype
                    state[name] = value.to(device=p.device, dtype=dtype)

    @staticmethod
    def _dense_step(p, state, group, beta1, beta2):
        grad, m, v = p.grad, state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        step = state["step"]
        p.mul_(1 - group["lr"] * group["weight_decay"])
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if step.dim():  # a lazy group given a dense gradient: every row took a step
            bc1, bc2_sqrt = _bias_corrections(step, beta1, beta2, p)
        else:
            bc1, bc2_sqrt = 1 - beta1 ** step.item(), math.sqrt(1 - beta2 ** step.item())
        denom = (v.sqrt() / bc2_sqrt).add_(group["eps"])
        p.add_(-group["lr"] * (m / bc1) / denom)

    @staticmethod
    def _sparse_step(p, state, group, beta1, beta2):
        grad = p.grad.coalesce()
        rows, values = grad.indices()[0], grad.values()  # [k], [k, ...]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        state["step"][rows] += 1
        m_rows = m[rows].lerp_(values, 1 - beta1)
        v_rows = v[rows].mul_(beta2).addcmul_(values, values, value=1 - beta2)
        m[rows], v[rows] = m_rows, v_rows
        bc1, bc2_sqrt = _bias_corrections(state["step"][rows], beta1, beta2, p)
        denom = (v_rows.sqrt() / bc2_sqrt).add_(group["eps"])
        p[rows] -= group["lr"] * (m_rows / bc1) / denom


def _bias_corrections(step: torch.Tensor, beta1: float, beta2: float, p: torch.Tensor):
    """``1 − β1^t`` and ``sqrt(1 − β2^t)`` per row ``[k, 1, ...]`` for integer counts ``t``
    ``[k]``, in ``p``'s dtype on its device: ``1 − β^t = −expm1(t·ln β)`` keeps full relative
    precision without float64."""
    t = step.to(p.dtype).reshape((-1,) + (1,) * (p.dim() - 1))
    bc1 = -torch.expm1(t * math.log(beta1))
    bc2_sqrt = (-torch.expm1(t * math.log(beta2))).sqrt()
    return bc1, bc2_sqrt


def build_optimizer(
    model,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    sparse_users: str | bool = "auto",
    user_state: str = "full",
    user_lr_scale: float = USER_LR_SCALE,
) -> PersonalAdamW:
    """The optimizer for a ``PersonalizedRewardModel``: shared parameters with
    ``weight_decay``, per-user tables in a lazy group without it.

    ``sparse_users``: ``"auto"`` (the default, as on the command line) gives user tables
    row-sparse gradients from ``SPARSE_USERS_THRESHOLD`` users, ``"on"``/``True`` always,
    ``"off"``/``False`` never (the choice is set on the model: ``model.router.sparse_grads``).

    ``user_state``: ``"full"`` keeps Adam's two moments for every coordinate of the user tables
    (memory: weights × 3); ``"rowwise"`` keeps one scalar per user row and table (memory close
    to the weights alone): the row's RMS gradient scales its step, as Adam's second moment
    does, so the same ``lr`` suits both.

    ``user_lr_scale``: the user tables' group steps at ``lr`` times this (the scheduler scales
    both groups alike); the default is training's (``TrainConfig.user_lr_scale``).
    """
    if user_state not in USER_STATES:
        raise ValueError(f"user_state must be one of {USER_STATES}, got {user_state!r}")
    if isinstance(sparse_users, bool):
        sparse_users = "on" if sparse_users else "off"
    if sparse_users not in SPARSE_USERS:
        raise ValueError(f"sparse_users must be one of {SPARSE_USERS}, got {sparse_users!r}")
    model.router.sparse_grads = sparse_users == "on" or (
        sparse_users == "auto" and model.num_users >= SPARSE_USERS_THRESHOLD
    )
    shared = model.shared_parameters()
    groups = [{"params": shared, "weight_decay": weight_decay}] if shared else []
    users = [p for p in model.user_parameters() if p.requires_grad]
    if users:
        rowwise = user_state == "rowwise"
        groups.append(
            {
                "params": users,
                "lr": lr * user_lr_scale,
                "weight_decay": 0.0,
                "lazy": True,
                "rowwise": rowwise,
            }
        )
    return PersonalAdamW(groups, lr=lr)


def clip_grad_norm_(params, max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` that also takes row-sparse gradients."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    squares = []
    for g in grads:
        if g.is_sparse:
            g = g.coalesce()
            squares.append(g.values().float().pow(2).sum())
        else:
            squares.append(g.float().pow(2).sum())
    norm = math.sqrt(sum(float(x) for x in squares))  # grads may sit on several devices
    if norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads:
            g.mul_(scale)
    return norm


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

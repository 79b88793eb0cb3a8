"""Per-user rewards for TRL's ``GRPOTrainer`` and ``RLOOTrainer`` (``reward_funcs=[...]``).

TRL calls a reward function as ``f(prompts=..., completions=..., completion_ids=..., **columns)``
where every other dataset column arrives as a list with one entry per completion; it takes one
float per completion back, or ``None`` for a completion with no reward. TRL itself stays an
optional dependency (``pip install sharelora[rlhf]``): nothing here imports it.

``PersonalizedReward`` is a picklable class (TRL's asynchronous trainer scores in a spawned
process): it holds only the model's path and options, and loads the model on first use in the
process that calls it. Prompts and completions may be plain text or chat messages; both go
through the same rendering as training (``sharelora.render``), so a completion gets the reward
that the same text got in training.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

UNKNOWN_USER = ("error", "population", "none")


class PersonalizedReward:
    """``r_u(prompt, completion)`` for the user in each row's ``user_column``.

    Args:
        model_dir: a directory written by ``sharelora train`` (or ``save_pretrained``).
        user_column: the dataset column holding each row's user.
        unknown_user: a user the model does not know: ``"error"`` raises, ``"population"``
            scores with the population model, ``"none"`` returns ``None`` for that completion
            (TRL then leaves it out of that reward).
        batch_size: rows per forward pass.
        device: where the reward model runs (default: CUDA when available, else the CPU).
    """

    def __init__(
        self,
        model_dir: str,
        user_column: str = "user",
        unknown_user: str = "error",
        batch_size: int = 32,
        device: str | None = None,
    ):
        if unknown_user not in UNKNOWN_USER:
            raise ValueError(f"unknown_user must be one of {UNKNOWN_USER}, got {unknown_user!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model_dir = str(model_dir)
        self.user_column = user_column
        self.unknown_user = unknown_user
        self.batch_size = batch_size
        self.device = device
        self.__name__ = "sharelora_reward"  # TRL's name for the reward in its logs
        self._model = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        # The loaded model and the lock stay in this process; a copy loads its own.
        return {k: v for k, v in self.__dict__.items() if k not in ("_model", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _model=None, _lock=threading.Lock())

    @property
    def model(self):
        if self._model is None:
            import torch

            from .model import PersonalizedRewardModel

            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            self._model = PersonalizedRewardModel.from_pretrained(self.model_dir).to(device).eval()
        return self._model

    def _users(self, n: int, columns: dict) -> list:
        if self.user_column not in columns:
            available = sorted(k for k in columns if not k.startswith(("trainer_", "log_")))
            raise ValueError(
                f"no {self.user_column!r} column reached the reward function (columns: "
                f"{', '.join(available) or 'none'}); add it to the dataset or pass "
                "user_column=..."
            )
        users = columns[self.user_column]
        if isinstance(users, (str, bytes)) or not hasattr(users, "__iter__"):
            users = [users] * n  # one user for the whole call
        users = list(users)  # a list, tuple or NumPy array of str/int ids
        if len(users) != n:
            raise ValueError(f"{len(users)} users for {n} completions")
        return users

    def score(self, prompts: Sequence, completions: Sequence, users: Sequence) -> list:
        """Rewards for rows of ``(prompt, completion, user)``; ``None`` for unknown users when
        ``unknown_user="none"``."""
        from .score import score_texts

        with self._lock:  # one forward at a time per model (the population row may be added)
            model = self.model
            if self.unknown_user != "none":
                return score_texts(
                    model, prompts, completions, users, self.batch_size, self.unknown_user
                )
            known = [i for i, u in enumerate(users) if u in model.users]
            rewards: list = [None] * len(users)
            scored = score_texts(
                model,
                [prompts[i] for i in known],
                [completions[i] for i in known],
                [users[i] for i in known],
                self.batch_size,
            )
            for i, r in zip(known, scored, strict=True):
                rewards[i] = r
            return rewards

    def __call__(self, prompts, completions, completion_ids=None, **columns) -> list:
        return self.score(list(prompts), list(completions), self._users(len(completions), columns))


class AsyncPersonalizedReward(PersonalizedReward):
    """``PersonalizedReward`` with an ``async`` call: TRL awaits it beside its other async
    rewards while the model scores in a worker thread."""

    async def __call__(self, prompts, completions, completion_ids=None, **columns) -> list:
        call = super().__call__
        return await asyncio.to_thread(call, prompts, completions, completion_ids, **columns)


def reward_function(model_dir: str, batch_size: int = 32, device: str | None = None, **options):
    """``PersonalizedReward(model_dir, ...)``: kept for code written against earlier versions."""
    return PersonalizedReward(model_dir, batch_size=batch_size, device=device, **options)

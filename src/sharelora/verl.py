"""A per-user reward for verl: ``custom_reward_function.path`` pointing at this module's file and
``custom_reward_function.name: compute_score``.

verl calls ``compute_score(data_source, solution_str, ground_truth, extra_info, **reward_kwargs)``
once per sample. The user and the prompt come in ``extra_info`` (put them there when building
the parquet: ``extra_info={"user": ..., "prompt": ...}``); the model directory comes from
``reward_kwargs`` (``custom_reward_function.reward_kwargs.model_dir``) or, failing that, the
``SHARELORA_MODEL`` environment variable. Each process loads the model once and keeps it.
"""

from __future__ import annotations

import asyncio
import os

from .trl import PersonalizedReward

MODEL_ENV = "SHARELORA_MODEL"
_loaded: dict[tuple, PersonalizedReward] = {}


def _reward(model_dir: str | None, unknown_user: str, device: str | None) -> PersonalizedReward:
    path = model_dir or os.environ.get(MODEL_ENV)
    if not path:
        raise ValueError(
            f"no reward model: pass model_dir in custom_reward_function.reward_kwargs or set "
            f"{MODEL_ENV}=DIR"
        )
    key = (path, unknown_user, device)
    if key not in _loaded:
        _loaded[key] = PersonalizedReward(path, unknown_user=unknown_user, device=device)
    return _loaded[key]


def compute_score(
    data_source: str | None,
    solution_str: str,
    ground_truth=None,
    extra_info: dict | None = None,
    model_dir: str | None = None,
    unknown_user: str = "error",
    device: str | None = None,
    **kwargs,
) -> float:
    """``r_u(extra_info["prompt"], solution_str)`` for ``u = extra_info["user"]``.

    ``data_source`` and ``ground_truth`` are verl's and unused: the reward is the user's
    preference model. ``unknown_user``: ``"error"`` or ``"population"``.
    """
    info = extra_info or {}
    reward = _reward(model_dir, unknown_user, device)
    if "user" not in info and reward.model.adapter_config.personalized:
        raise ValueError(
            'extra_info has no "user": add extra_info={"user": ..., "prompt": ...} to each row'
        )
    user = info.get("user", reward.model.users.names[0])
    return reward.score([info.get("prompt", "")], [solution_str], [user])[0]


async def compute_score_async(*args, **kwargs) -> float:
    """``compute_score`` for verl's asynchronous reward loop (scores on a worker thread)."""
    return await asyncio.to_thread(compute_score, *args, **kwargs)

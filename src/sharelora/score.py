"""Scoring texts for users: the inference entry point behind ``sharelora score`` and TRL."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .data.collate import PairTokenizer, feature_rows

# One lock per model: a call switches the model to eval mode and back, and may add the
# population's row for unknown users; another thread must not run while either is half done.
_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()


def scoring_lock(model) -> threading.Lock:
    """The lock that serialises scoring calls on ``model``."""
    with _GUARD:
        return _LOCKS.setdefault(model, threading.Lock())


def score_texts(
    model,
    prompts: Sequence | None,
    responses: Sequence,
    users: Sequence[object],
    batch_size: int = 32,
    unknown_user: str = "error",
) -> list[float]:
    """``r_u(prompt, response)`` for each row; the same rendering, tokenization and truncation
    rule as training. Texts are plain strings or chat messages (``sharelora.render``). An
    unknown user raises ``UnknownUserError``, or with ``unknown_user="population"`` is scored
    with the population model (``sharelora.population``)."""
    return score_rows(model, prompts, responses, users, batch_size, unknown_user)[0]


class Scored(NamedTuple):
    rewards: list[float]
    truncated: list[bool]  # cut to the model's max_length
    tokens: list[int]  # tokens the model read, per row


@torch.no_grad()
def score_rows(
    model,
    prompts: Sequence | None,
    responses: Sequence,
    users: Sequence[object],
    batch_size: int = 32,
    unknown_user: str = "error",
) -> Scored:
    """``score_texts``, with each row's truncation flag and token count.

    Safe to call from several threads: calls on one model take its ``scoring_lock`` in turn."""
    if prompts is None:
        prompts = [""] * len(responses)
    if not (len(prompts) == len(responses) == len(users)):
        raise ValueError(
            f"prompts, responses and users must have one entry per row, got {len(prompts)}, "
            f"{len(responses)} and {len(users)}"
        )
    if unknown_user not in ("error", "population"):
        raise ValueError(f"unknown_user must be 'error' or 'population', got {unknown_user!r}")
    if not responses:
        return Scored([], [], [])
    with scoring_lock(model):
        return _score(model, prompts, responses, users, batch_size, unknown_user)


def _score(model, prompts, responses, users, batch_size, unknown_user) -> Scored:
    ids = None
    if model.adapter_config.personalized:
        if unknown_user == "population":
            from .population import POPULATION, add_population_user

            if any(u not in model.users for u in users):
                add_population_user(model)
            users = [u if u in model.users else POPULATION for u in users]
        ids = model.users.encode(users)
    encoder = PairTokenizer(model.tokenizer, model.max_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = Scored([], [], [])
    try:
        for start in range(0, len(responses), batch_size):
            stop = start + batch_size
            features = encoder(prompts[start:stop], responses[start:stop])
            out.truncated.extend(encoder.last_truncated)
            out.tokens.extend(len(row) for row in features["input_ids"])
            batch = encoder.pad(feature_rows(features)).to(device)
            user_ids = ids[start:stop].to(device) if ids is not None else None
            out.rewards.extend(model(**batch, user_ids=user_ids).tolist())
    finally:
        model.train(was_training)
    return out

"""Scoring texts for users: the inference entry point behind ``sharelora score`` and TRL."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .data.collate import PairTokenizer


@torch.no_grad()
def score_texts(
    model,
    prompts: Sequence[str] | None,
    responses: Sequence[str],
    users: Sequence[object],
    batch_size: int = 32,
) -> list[float]:
    """``r_u(prompt, response)`` for each row; the same tokenization and truncation rule as
    training. Unknown users raise ``KeyError``."""
    if prompts is None:
        prompts = [""] * len(responses)
    if not (len(prompts) == len(responses) == len(users)):
        raise ValueError(
            f"prompts, responses and users must have one entry per row, got {len(prompts)}, "
            f"{len(responses)} and {len(users)}"
        )
    if not responses:
        return []
    ids = model.users.encode(users) if model.adapter_config.personalized else None
    encoder = PairTokenizer(model.tokenizer, model.max_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rewards: list[float] = []
    try:
        for start in range(0, len(responses), batch_size):
            stop = start + batch_size
            features = encoder(prompts[start:stop], responses[start:stop])
            rows = [
                dict(zip(features, v, strict=True)) for v in zip(*features.values(), strict=True)
            ]
            batch = model.tokenizer.pad(rows, return_tensors="pt").to(device)
            user_ids = ids[start:stop].to(device) if ids is not None else None
            rewards.extend(model(**batch, user_ids=user_ids).tolist())
    finally:
        model.train(was_training)
    return rewards

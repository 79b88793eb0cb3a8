"""Onboarding: add users to a trained model from a few comparisons each.

Only the new users' rows of the per-user tables train; the shared factors, the head and the
backbone stay frozen, and every existing user's reward stays bit-identical (row-sparse
gradients and lazy Adam touch only the rows of users in the batch, and a batch holds only new
users). A new user starts from the population adapter, the mean of the trained users' rows,
which is also the zero-shot model for a user with no data.
"""

from __future__ import annotations

from dataclasses import replace

from .data import Comparison
from .presets import PRESETS
from .recipe import TrainConfig, train


def onboard(
    model,
    data: list[Comparison],
    val_data: list[Comparison] | None = None,
    config: TrainConfig | None = None,
    output_dir=None,
) -> dict:
    """Fit the users of ``data`` that ``model`` does not know; returns ``train``'s result."""
    if not model.adapter_config.personalized:
        raise ValueError(
            "method 'shared' has no per-user factors to fit; use a personalized "
            "model (sharelora, core, diag, ...)"
        )
    new = list(dict.fromkeys(c.user for c in data if c.user not in model.users))
    known = sorted({c.user for c in data} - set(new))
    if known:
        raise ValueError(
            f"onboarding data holds users the model already knows: "
            f"{', '.join(known[:5])}; onboard only new users"
        )
    if not new:
        raise ValueError("onboarding data holds no comparisons")
    model.add_users(new)
    for p in model.shared_parameters():
        p.requires_grad_(False)
    # The preset onboard: row-sparse, so that only the new users' rows move; strength 1, as
    # shrinking toward the population would move every existing user too; and the population
    # as trained (a learner here would learn from the new users alone). The model's own token
    # budget: another max_length would re-tokenize existing users.
    settings = PRESETS["onboard"].settings
    cfg = replace(config or TrainConfig(), **settings, max_length=model.max_length)
    return train(model, data, val_data, cfg, output_dir)

"""Personalization strength: how far each user moves from the population model.

After personal training, every trainable tensor is set to::

    θ(γ) = θ_population + γ (θ_personal − θ_population)        γ ∈ [0, 1]

γ = 1 is the trained personal model; γ = 0 gives every user the population model
(``sharelora.population``). Choosing γ by validation loss is weight-space shrinkage toward a
common model: where users agree, a personal adapter fitted on a few comparisons mostly fits
noise and validation picks a small γ; where they disagree it picks γ near 1.
"""

from __future__ import annotations

import torch

from . import population as pop
from .config import STRENGTHS


def snapshot(model) -> dict[str, torch.Tensor]:
    """A copy of the model's trainable tensors (adapters and head), by name."""
    return {k: v.clone() for k, v in model.trainable_state_dict().items()}


def apply_strength(model, strength, val_metrics, evaluate_val):
    """Set ``model`` to its strength (a number, or ``"auto"``: the lowest validation loss of
    ``STRENGTHS``, ties to the more personal); returns ``(γ, validation metrics at γ, the
    validation metrics of every γ tried)``. ``val_metrics`` are those of the model as it is
    (γ = 1); ``evaluate_val(tag)`` evaluates the model in its current state."""
    if not model.adapter_config.personalized or strength == 1:
        return 1.0, val_metrics, {}
    personal, base = snapshot(model), pop.of(model)
    tried = {}
    if strength == "auto":
        if not val_metrics:
            return 1.0, val_metrics, {}
        tried[1.0] = val_metrics
        for gamma in STRENGTHS[:-1]:
            pop.lerp(model, base, personal, gamma)
            tried[gamma] = evaluate_val(f"strength {gamma}")
        strength = min(tried, key=lambda g: (tried[g]["loss"], -g))
        val_metrics = tried[strength]
    pop.lerp(model, base, personal, float(strength))
    if val_metrics and not tried:  # a fixed strength: report validation where the model is
        val_metrics = evaluate_val(f"strength {strength}")
    return float(strength), val_metrics, tried

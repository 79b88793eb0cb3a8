"""Personalization strength: how far each user moves from the population model.

After personal training, user ``u``'s rows of every per-user table are set to::

    T_u(κ) = T̄ + γ_u (T_u − T̄)        γ_u = n_u / (n_u + κ)

where ``T̄`` is the population (``sharelora.population``) and ``n_u`` the user's training
comparisons; shared tensors (shared factors, the head) move by the median user's γ. This is the
posterior mean of a Gaussian prior on the deviation ``Δ_u = T_u − T̄`` in its Laplace form: a
user's summed Bradley-Terry loss has curvature ``≈ n_u h`` around their fit, so a prior of
precision ``κ h`` shrinks the fit by ``n_u / (n_u + κ)``. A user with 5 comparisons stays near
``T̄``, one with 500 keeps their own model.

``strength="auto"`` chooses the prior's scale ``κ`` by validation likelihood over a grid
(``SHRINKAGE`` times the median ``n_u``: γ = 1, ¾, ½, ¼, 0 for the median user), the same way
for every method. The likelihood is that of the ranking the rewards make, with one scale of
the margins profiled out (``evaluate.calibrated_loss``): a personal model fitted on a few
comparisons is over-confident, and shrinking it lowers the raw loss by taming that scale even
where it ranks worse (on Jester's seen jokes the raw loss chose a strong shrinkage that cost
test accuracy; see docs/personalization.md). Where users agree it picks a large κ (every
user near the population; at κ = ∞ the model *is* the population); where they disagree, a
small one. A number ``γ`` in [0, 1] instead moves every user by that same fraction.
"""

from __future__ import annotations

import math

import torch

from . import population as pop
from .config import SHRINKAGE


def snapshot(model) -> dict[str, torch.Tensor]:
    """A copy of the model's trainable tensors (adapters and head), by name."""
    return {k: v.clone() for k, v in model.trainable_state_dict().items()}


def user_weights(counts: torch.Tensor, kappa: float) -> torch.Tensor:
    """``γ_u = n_u / (n_u + κ)`` ``[N]`` for per-user training counts ``[N]``; κ = ∞ gives 0."""
    counts = counts.float()
    if math.isinf(kappa):
        return torch.zeros_like(counts)
    return counts / (counts + kappa)


def apply_strength(model, strength, val_metrics, evaluate_val, counts: torch.Tensor):
    """Set ``model`` to its strength; returns ``(γ of the median user, validation metrics
    there, {κ/median n: validation metrics} of every scale tried)``.

    ``strength`` is ``"auto"`` (the lowest calibrated validation loss over ``SHRINKAGE``, ties
    to the more personal) or a number γ for every user. ``val_metrics`` are those of the model as it
    is (κ = 0); ``evaluate_val(tag)`` evaluates the model in its current state; ``counts`` are
    the training comparisons of every user ``[N]``.
    """
    if not model.adapter_config.personalized or strength == 1:
        return 1.0, val_metrics, {}
    personal, base = snapshot(model), pop.of(model)
    trained = counts[counts > 0].float()
    median = float(trained.median()) if len(trained) else 1.0
    if strength != "auto":
        pop.lerp(model, base, personal, float(strength))
        if val_metrics:  # a fixed strength: report validation where the model is
            val_metrics = evaluate_val(f"strength {strength}")
        return float(strength), val_metrics, {}
    if not val_metrics:
        return 1.0, val_metrics, {}
    tried = {0.0: val_metrics}
    for scale in SHRINKAGE[1:]:
        kappa = scale * median
        pop.lerp(model, base, personal, 1 / (1 + scale), user_weights(counts, kappa))
        tried[scale] = evaluate_val(f"shrinkage {scale:g}")
    best = min(tried, key=lambda s: (tried[s]["calibrated_loss"], s))
    pop.lerp(model, base, personal, 1 / (1 + best), user_weights(counts, best * median))
    return 1 / (1 + best), tried[best], tried

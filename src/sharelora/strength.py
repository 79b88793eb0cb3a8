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
test accuracy; see docs/research-log.md). Where users agree it picks a large κ (every
user near the population; at κ = ∞ the model *is* the population); where they disagree, a
small one. A number ``γ`` in [0, 1] instead moves every user by that same fraction.

The choice is the lowest loss (``rule="lowest"``, the default) or the one-standard-error rule
(``rule="one-se"``; Breiman et al. 1984; Hastie, Tibshirani and Friedman, *Elements of
Statistical Learning* §7.10): the strongest shrinkage whose loss is within one standard error
of the lowest, the error being that of the paired difference with the validation pairs
clustered by user and by text (``paired_se``). It keeps the population unless validation says
clearly that users differ: on Jester's new jokes that helped ``independent`` and ``head`` by
1.2-1.4 points, but it cost ``sharelora`` 4.9 points on the demo, whose validation holds 12
pairs per user (docs/research-log.md; measured with the error clustered by user alone).
"""

from __future__ import annotations

import math

import torch

from . import population as pop
from .config import POPULATION_Z, SHRINKAGE


def snapshot(model) -> dict[str, torch.Tensor]:
    """A copy of the model's trainable tensors (adapters and head), by name."""
    return {k: v.clone() for k, v in model.trainable_state_dict().items()}


def user_weights(counts: torch.Tensor, kappa: float) -> torch.Tensor:
    """``γ_u = n_u / (n_u + κ)`` ``[N]`` for per-user training counts ``[N]``; κ = ∞ gives 0."""
    counts = counts.float()
    if math.isinf(kappa):
        return torch.zeros_like(counts)
    if kappa == 0:  # every user keeps their own model, one with no pairs too (not 0 / 0)
        return torch.ones_like(counts)
    return counts / (counts + kappa)


def paired_se(a: dict, b: dict) -> float:
    """Standard error of ``a``'s mean calibrated loss minus ``b``'s on the same validation
    pairs: ``a`` and ``b`` are ``summarize``'s metrics. Pairs are not independent: a user's
    share their parameters, and pairs that share a text share its score, for every user who
    judged it (Jester's validation holds some 35 jokes under every user's pairs). So the error
    is clustered by user and, where the metrics keep their ``pairs``, by text too
    (``_shared_text_terms``); never below the error clustered by user alone. Zero with fewer
    than two users (the rule then takes the lowest loss)."""
    if len(a["users"]) < 2:
        return 0.0
    if "pairs" in a and "pairs" in b:  # per pair: [P]
        users, texts = a["pairs"]["users"], a["pairs"]["texts"]
        d = torch.tensor(a["pairs"]["calibrated_loss"], dtype=torch.float64)
        d -= torch.tensor(b["pairs"]["calibrated_loss"], dtype=torch.float64)
        weight = torch.ones_like(d)
    else:  # per user: [U], each user's summed difference
        users, texts = list(a["users"]), None
        weight = torch.tensor([a["users"][u]["n"] for u in users], dtype=torch.float64)
        d = weight * torch.tensor(
            [a["users"][u]["calibrated_loss"] - b["users"][u]["calibrated_loss"] for u in users],
            dtype=torch.float64,
        )
    e = d - weight * d.sum() / weight.sum()  # centred on the mean difference
    variance = _cluster_sumsq(e, [(u,) for u in users])
    if texts is not None:  # a shared text's covariance, where it adds (it can come out < 0)
        variance += max(0.0, _shared_text_terms(e, users, texts))
    clusters = len(set(users))
    return (variance * clusters / (clusters - 1)) ** 0.5 / weight.sum().item()


def _cluster_sumsq(e: torch.Tensor, keys: list[tuple]) -> float:
    """``Σ_k (Σ_{i in k} e_i)²``: each item ``i`` adds ``e_i`` to every cluster in ``keys[i]``."""
    sums: dict = {}
    for value, mine in zip(e.tolist(), keys, strict=True):
        for k in mine:
            sums[k] = sums.get(k, 0.0) + value
    return sum(v * v for v in sums.values())


def _shared_text_terms(e: torch.Tensor, users: list[str], texts: list[tuple[str, str]]) -> float:
    """What pairs that share a text add to ``Σ e_i e_j`` over every two pairs (a pair with
    itself too) that share a user or a text: the dyadic-robust variance of Aronow, Samii and
    Assenova (*Political Analysis* 2015), users one more shared member. By inclusion and
    exclusion over clusters: a shared text (a pair holds two, so two pairs over the same two
    texts are counted twice and taken back once), minus the pairs that share a user as well
    (the user's clusters hold them already)."""
    both = [frozenset(t) for t in texts]
    mine = list(zip(users, both, strict=True))
    by_text = _cluster_sumsq(e, [tuple(t) for t in both]) - _cluster_sumsq(e, [(t,) for t in both])
    overlap = _cluster_sumsq(e, [tuple((u, t) for t in p) for u, p in mine])
    overlap -= _cluster_sumsq(e, [((u, p),) for u, p in mine])
    return by_text - overlap


def choose_scale(tried: dict[float, dict], rule: str) -> tuple[float, dict[float, float]]:
    """The scale ``rule`` picks from ``tried`` ({scale: validation metrics}): the lowest
    calibrated loss (ties to the more personal), or for ``"one-se"`` the largest shrinkage
    within one paired standard error of it; also each scale's error against the lowest."""
    lowest = min(tried, key=lambda s: (tried[s]["calibrated_loss"], s))
    low = tried[lowest]["calibrated_loss"]
    se = {s: paired_se(m, tried[lowest]) for s, m in tried.items()}
    if rule != "one-se":
        return lowest, se
    return max(s for s, m in tried.items() if m["calibrated_loss"] - low <= se[s]), se


def population_gate(tried: dict[float, dict], chosen: float) -> tuple[float, dict]:
    """``chosen`` if its calibrated validation loss beats the population's (scale ∞) by more
    than ``POPULATION_Z`` paired standard errors (``paired_se``), else ∞: no personalization
    that validation cannot show. Also the gain and its error."""
    if math.isinf(chosen):
        return chosen, {"gain": 0.0, "se": 0.0}
    population, personal = tried[math.inf], tried[chosen]
    gain = population["calibrated_loss"] - personal["calibrated_loss"]
    se = paired_se(population, personal)
    return (chosen if gain > POPULATION_Z * se else math.inf), {"gain": gain, "se": se}


def _median_count(counts: torch.Tensor) -> float:
    trained = counts[counts > 0].float()
    return float(trained.median()) if len(trained) else 1.0


def _shrink(model, base: dict, personal: dict, scale: float, counts, median=None) -> None:
    """Every user at ``κ = scale · median n_u``; shared tensors at the median user's γ.
    ``median``: of every user's count when ``counts`` holds some of them (a shard's)."""
    kappa = scale * (median or _median_count(counts))
    pop.lerp(model, base, personal, 1 / (1 + scale), user_weights(counts, kappa))


def apply_scale(
    model, scale: float, counts: torch.Tensor, start: dict | None = None, median=None
) -> float:
    """Shrink ``model`` at a scale chosen before (a refit repeats validation's choice with its
    own counts ``[N]``); ``scale=None`` serves ``start`` instead. Returns the median user's
    γ."""
    if scale is None:
        _serve_start(model, start)
        return 0.0
    if model.adapter_config.personalized and scale:
        _shrink(model, pop.of(model), snapshot(model), scale, counts, median)
    return 1 / (1 + scale)


def _serve_start(model, start: dict) -> None:
    """Every tensor back at the start (a trained shared model), which becomes the population."""
    pop.assign(model, start)
    model.population = start


def apply_strength(
    model,
    strength,
    val_metrics,
    evaluate_val,
    counts: torch.Tensor,
    rule: str = "lowest",
    start: dict | None = None,
    median: float | None = None,
):
    """Set ``model`` to its strength; returns ``(γ of the median user, validation metrics
    there, {κ/median n: validation metrics} of every scale tried)``; each tried scale's metrics
    carry ``se``, the paired standard error of its loss against the lowest.

    ``strength`` is ``"auto"`` (over ``SHRINKAGE``, by ``rule``: ``"lowest"`` loss or
    ``"one-se"``, then ``population_gate``) or a number γ for every user. ``val_metrics`` are
    those of the model as it is (κ = 0); ``evaluate_val(tag)`` evaluates the model in its
    current state; ``counts`` are the training comparisons of every user ``[N]`` (``median``:
    their median over every process's users, when the model holds a shard of them).

    ``start`` (a population dict: the trained shared model training started from) is the
    fallback unless the trained population beats it as ``population_gate`` asks a personal
    model to. The gate then compares the personal choice with that fallback; serving the start
    returns γ = 0, its metrics under ``tried["start"]``, and sets ``model.population`` to it.
    """
    if not model.adapter_config.personalized or strength == 1:
        return 1.0, val_metrics, {}
    personal, base = snapshot(model), pop.of(model)
    if strength != "auto":
        pop.lerp(model, base, personal, float(strength))
        if val_metrics:  # a fixed strength: report validation where the model is
            val_metrics = evaluate_val(f"strength {strength}")
        return float(strength), val_metrics, {}
    if not val_metrics:
        return 1.0, val_metrics, {}
    tried = {0.0: val_metrics}
    for scale in SHRINKAGE[1:]:
        _shrink(model, base, personal, scale, counts, median)
        tried[scale] = evaluate_val(f"shrinkage {scale:g}")
    chosen, se = choose_scale(tried, rule)
    gate = {"z": POPULATION_Z}  # the evidence behind what is served, for the summary
    fallback = None  # None: the trained population
    if start is not None:
        # The start (a trained shared model) is the fallback unless the trained population
        # beats it by the gate's margin too: no extra training that validation cannot show.
        pop.assign(model, start)
        at_start = evaluate_val("start")
        kept, gate["population_vs_start"] = population_gate(
            {0.0: tried[math.inf], math.inf: at_start}, 0.0
        )
        if math.isinf(kept):
            fallback = at_start
    options = tried if fallback is None else {**tried, math.inf: fallback}
    served, gate["personal_vs_fallback"] = population_gate(options, chosen)
    gate["personal_vs_fallback"]["scale"] = f"{chosen:g}"  # "inf": validation chose T̄
    tried = {s: {**m, "se": se[s]} for s, m in tried.items()}
    if fallback is not None:
        tried["start"] = fallback
    if fallback is not None and math.isinf(served):
        _serve_start(model, start)
        tried["start"]["gate"] = gate
        return 0.0, tried["start"], tried
    tried[served]["gate"] = gate
    _shrink(model, base, personal, served, counts, median)
    return 1 / (1 + served), tried[served], tried

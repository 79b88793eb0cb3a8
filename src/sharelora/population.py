"""The population model: the one reward every user shares before personalizing.

It has one meaning everywhere: a dict of the model's trainable tensors (adapters and head) by
name, in which each per-user table holds a single row ``[1, ...]`` standing for every user. It
is

- where personal training starts (``assign`` copies it into every user's rows),
- the center of the prior on every user's deviation during training (``deviation_penalty``)
  and what the personalization strength shrinks toward afterwards (``sharelora.strength``),
- where a new user starts (``PersonalizedRewardModel.add_users``, onboarding), and
- the reward of a user the model does not know (``--unknown-user population``).

It comes from, in this order: a trained ``shared`` model (``from_shared``), the end of the
shared warm-up (``from_row``: the row every user was routed to), else the mean over users of
each per-user table (``mean_of``). Training stores the first two on the model
(``model.population``), which saves them as ``population.safetensors`` beside the adapters;
with neither, a run with a prior stores the rows every user starts from (the prior needs a
fixed center); ``of(model)`` falls back to the mean.
"""

from __future__ import annotations

import torch

from .config import FACTORINGS


def _user_tables(model) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{pname}": table
        for name, layer in model.adapter_layers.items()
        for pname, table in layer.user_parameters.items()
    }


def _with_rows(model, row_of) -> dict[str, torch.Tensor]:
    """Every trainable tensor, each per-user table replaced by ``row_of(table)`` ``[1, ...]``."""
    tables = _user_tables(model)
    return {
        name: (row_of(tables[name]) if name in tables else t).detach().clone()
        for name, t in model.trainable_state_dict().items()
    }


def mean_of(model) -> dict[str, torch.Tensor]:
    """The population as the mean over users of each per-user table."""
    return _with_rows(model, lambda table: table.mean(0, keepdim=True))


def from_row(model, row: int = 0) -> dict[str, torch.Tensor]:
    """The population as one user's row of every table (the row a shared warm-up trained)."""
    return _with_rows(model, lambda table: table[row : row + 1])


@torch.no_grad()
def orthonormal_b(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-factor ``B A`` as ``B' A'`` with ``B'`` of orthonormal columns and ``A' = S Vᵀ``.

    A trained LoRA's factoring is an accident of its start (``B`` from zero, ``A`` Kaiming):
    a shared MiniLM model trained on Jester ends with ``B``'s singular values at 1.6, 0.03,
    0.01, ... and ``A``'s at 3.2, 0.6, 0.6, .... A user who owns ``A_u`` changes the weight by
    ``s B ΔA_u``: in that factoring most directions of ``B``'s column space are out of reach
    at Adam's step size, and the prior ``|ΔA_u|²`` prices one unit of weight change
    differently in each. With orthonormal ``B'``, ``|B' ΔA_u| = |ΔA_u|``: every direction is
    as reachable, and the factor prior is the prior on the user's weight change (over ``s²``).
    ``B' A' = B A`` to float rounding; ``A'``'s rows are the singular directions of ``B A``
    scaled by its singular values.

    Via thin QR of both factors and the SVD of an ``[r, r]`` core, so an 8B model's
    ``[4096, r]`` factors cost ``O((out + in) r²)``, not an ``[out, in]`` SVD.

    Args:
        a: ``[r, in]``; b: ``[out, r]``. Returns ``(A' [r, in], B' [out, r])`` in their dtypes,
        or ``(a, b)`` unchanged where ``r`` exceeds ``out`` or ``in`` (no ``r`` orthonormal
        columns exist).
    """
    if a.shape[0] > min(a.shape[1], b.shape[0]):
        return a, b
    # On the CPU in float32: a few [*, r] products, and no float64 or QR needed on MPS.
    qb, rb = torch.linalg.qr(b.float().cpu())  # [out, r], [r, r]
    qa, ra = torch.linalg.qr(a.float().cpu().T)  # [in, r], [r, r]
    u, s, vh = torch.linalg.svd(rb @ ra.T)  # B A = qb (u s vh) qaᵀ
    return (s[:, None] * (vh @ qa.T)).to(a), (qb @ u).to(b)


@torch.no_grad()
def from_shared(model, shared, factoring: str = "as-trained") -> dict[str, torch.Tensor]:
    """The population of ``model`` that scores every user as the trained ``shared`` model
    does: each per-user factor gets the shared factor, a core ``C_u`` the identity and a
    ``d_u`` ones; the head is the shared model's.

    ``factoring="as-trained"`` keeps the shared model's factors bit for bit;
    ``"orthonormal"`` re-factors each adapted layer's ``B A`` by ``orthonormal_b`` where users
    own ``A`` (``sharelora``, ``sharelora-head``, ``independent``): the same function, to float
    rounding, with ``B``'s columns orthonormal.
    """
    if factoring not in FACTORINGS:
        raise ValueError(f"factoring must be one of {FACTORINGS}, got {factoring!r}")
    if shared.adapter_config.method != "shared":
        raise ValueError(
            f"the population comes from a model trained with method 'shared', got "
            f"{shared.adapter_config.method!r}"
        )
    source = shared.trainable_state_dict()
    out = from_row(model)  # names and shapes; every value below is overwritten
    for name, layer in model.adapter_layers.items():
        if layer.is_head:
            out[f"{name}.user_W"].zero_()  # the shared head alone: no offset
            continue
        targets = {}  # "A", "B" -> this model's tensor of that factor (per-user or shared)
        for key in ("A", "B"):
            target = f"{name}.user_{key}" if hasattr(layer, f"user_{key}") else f"{name}.lora_{key}"
            src = source.get(f"{name}.lora_{key}")
            if src is None or src.shape != out[target].shape[-src.dim() :]:
                raise ValueError(
                    f"the shared model does not match this one at {name}.lora_{key} (same "
                    "backbone, rank, targets and top_layers are needed)"
                )
            out[target] = src.reshape(out[target].shape).clone()
            targets[key] = target
        if factoring == "orthonormal" and layer.user_a:
            a, b = (out[targets[key]] for key in ("A", "B"))  # [1?, r, in], [1?, out, r]
            a2, b2 = orthonormal_b(a.reshape(a.shape[-2:]), b.reshape(b.shape[-2:]))
            out[targets["A"]], out[targets["B"]] = a2.reshape(a.shape), b2.reshape(b.shape)
        if layer.core == "core":
            out[f"{name}.user_C"] = torch.eye(layer.rank).unsqueeze(0).to(out[f"{name}.user_C"])
        elif layer.core == "diag":
            out[f"{name}.user_d"].fill_(1.0)
    for name in model.trainable_backbone_names:
        out[name] = source[name].clone()
    return out


def of(model) -> dict[str, torch.Tensor]:
    """The model's population: the stored one, else the mean over users."""
    stored = getattr(model, "population", None)
    return stored if stored is not None else mean_of(model)


@torch.no_grad()
def assign(model, population: dict[str, torch.Tensor]) -> None:
    """Set every trainable tensor to the population (every user's rows to its one row), on
    each tensor's own device."""
    for name, tensor in model.trainable_state_dict().items():
        tensor.copy_(population[name].to(tensor).expand_as(tensor))


@torch.no_grad()
def lerp(
    model,
    population: dict,
    personal: dict,
    weight: float,
    user_weight: torch.Tensor | None = None,
) -> None:
    """Set the model to ``population + weight · (personal − population)``, tensor by tensor,
    on each tensor's own device (the population may have been taken on another). With
    ``user_weight`` ``[N]``, row ``u`` of every per-user table moves by ``user_weight[u]``
    instead (shared tensors by ``weight``)."""
    tables = _user_tables(model)
    for name, tensor in model.trainable_state_dict().items():
        base = population[name].to(tensor).expand_as(tensor)
        w = weight
        if user_weight is not None and name in tables:
            w = user_weight.to(tensor).view(-1, *[1] * (tensor.dim() - 1))
        tensor.copy_(torch.lerp(base, personal[name].to(tensor), w))


def deviation_penalty(
    model, pair_users: torch.Tensor, counts: torch.Tensor, on: str = "factors"
) -> torch.Tensor:
    """The Gaussian prior on every user's deviation ``Δ_u = T_u − T̄`` from the population,
    as a per-batch term: ``Σ_i |Δ_{u_i}|² / (2 n_{u_i})`` over the batch's pairs ``i``, divided
    by the batch size, summed over every adapted layer.

    Its mean over batches is ``(1/M) · ½ Σ_u |Δ_u|²`` for ``M`` training pairs, so ``τ`` times
    it added to the mean Bradley-Terry loss minimises ``Σ_i ℓ_i + (τ/2) Σ_u |Δ_u|²``: the
    prior against each user's *summed* loss, which a user with 5 comparisons cannot outweigh
    and one with 500 can. Only the batch's users' rows are read (row-sparse gradient when the
    tables are).

    Args:
        pair_users: ``[B]`` user id of each pair in the batch.
        counts: ``[N]`` training pairs of each user, on ``pair_users``' device.
        on: ``"factors"``: ``|Δ_u|²`` over the user's rows of every per-user table;
            ``"weights"``: over each layer's weight change (``PersonalLoRALayer.deviation_sq``).
    """
    users, in_batch = pair_users.unique(return_counts=True)  # [k], [k]
    weight = in_batch / (len(pair_users) * counts[users].clamp(min=1))  # [k]
    total = torch.zeros((), device=pair_users.device)
    for name, layer in model.adapter_layers.items():
        center = {p: model.population[f"{name}.{p}"] for p in layer.user_parameters}
        sq = layer.deviation_sq(users, center, weights=on == "weights")  # [k]
        total = total + (weight.to(sq) * sq).sum()
    return total / 2

"""The population model: the one reward every user shares before personalizing.

It has one meaning everywhere: a dict of the model's trainable tensors (adapters and head) by
name, in which each per-user table holds a single row ``[1, ...]`` standing for every user. It
is

- where personal training starts (``assign`` copies it into every user's rows),
- the center of the prior on every user's deviation during training (``deviation_penalty``)
  and what the personalization strength shrinks toward afterwards (``sharelora.strength``),
- where a new user starts (``PersonalizedRewardModel.add_users``, onboarding), and
- the reward of a user the model does not know (``--unknown-user population``).

It starts from, in this order: a trained ``shared`` model (``from_shared``), the end of the
shared warm-up (``from_row``: the row every user was routed to), else the rows every user
starts from. By default it then keeps learning (``TrainConfig.train_population``): during
personal training it is one more user, ``LEARNER``, whose pairs are every user's pairs, and the
prior pulls each user toward its rows as they move (``learner_rows``). At the end
(``detach_learner``) its rows and the shared tensors as trained are ``model.population``, saved
as ``population.safetensors`` beside the adapters: so κ = ∞ serves a shared model trained as
long as the personal one, never the frozen start. Without it, training stores the start
(the prior needs a center); ``of(model)`` falls back to the mean over users of each table.
"""

from __future__ import annotations

import torch

from .config import FACTORINGS


def user_tables(model) -> dict[str, torch.Tensor]:
    """Every per-user table ``[U, ...]``, by its name in the trainable state dict."""
    return {
        f"{name}.{pname}": table
        for name, layer in model.adapter_layers.items()
        for pname, table in layer.user_parameters.items()
    }


def _with_rows(model, row_of) -> dict[str, torch.Tensor]:
    """Every trainable tensor, each per-user table replaced by ``row_of(table)`` ``[1, ...]``."""
    tables = user_tables(model)
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
        if factoring == "orthonormal" and "A" in layer.spec.per_user:
            a, b = (out[targets[key]] for key in ("A", "B"))  # [1?, r, in], [1?, out, r]
            a2, b2 = orthonormal_b(a.reshape(a.shape[-2:]), b.reshape(b.shape[-2:]))
            out[targets["A"]], out[targets["B"]] = a2.reshape(a.shape), b2.reshape(b.shape)
        if layer.mixer.table:  # the mixer at its identity: the user is the shared model
            key = f"{name}.{layer.mixer.table}"
            like = {"dtype": out[key].dtype, "device": out[key].device}
            out[key] = layer.mixer.identity(len(out[key]), layer.rank, like)
    for name in model.trainable_backbone_names:
        out[name] = source[name].clone()
    return out


# The name under which a model scores the users it does not know (``--unknown-user population``).
POPULATION = "<population>"


def add_population_user(model) -> int:
    """Append the population as a user named ``POPULATION``; returns its id.

    Scoring an unknown user with it (``--unknown-user population``) gives the zero-shot reward:
    the population a run trained (``model.population``), else the mean of the users' rows.
    """
    if POPULATION in model.users:
        return model.users.id(POPULATION)
    return model.add_users([POPULATION])[0]


# The population while it learns: one more user, whose pairs are every user's pairs. The NUL
# keeps it apart from any name a data file can hold (names are stripped text).
LEARNER = "\x00population"


@torch.no_grad()
def add_learner(model, lr_scale: float = 1.0) -> int:
    """Append the population as a user that trains (``TrainConfig.train_population``), its
    rows at ``of(model)``, and store every other row as its deviation: ``T_u = T̄ + Δ_u``
    (``UserRouter.base_row``), so that what the population learns reaches every user at once
    and the prior on ``Δ_u`` has a fixed center, zero. Returns its id (the last).

    ``lr_scale``: the user tables' learning rate over the shared one. The population sees
    every batch, as a shared tensor does, and steps at the shared rate: its row holds
    ``lr_scale · T̄`` (Adam's step has one size whatever the gradient's scale, so a row that
    steps ``lr_scale`` times further moves ``T̄`` at the shared rate). Stepping its rows at the
    users' rate, a population fitting users who disagree wanders and drags every user along.
    """
    learner = model.add_users([LEARNER])[0]
    for table in user_tables(model).values():
        table[:learner] -= table[learner]
        table[learner] *= lr_scale
    model.router.base_row, model.router.base_scale = learner, lr_scale
    return learner


def learner_rows(model, learner: int) -> dict[str, torch.Tensor]:
    """The population's row of every per-user table ``[1, ...]``, detached, as users' rows
    see it: as the prior's center, ``|T_u − T̄|²`` is exactly ``|Δ_u|²``."""
    ids = torch.tensor([learner])
    return {
        f"{lname}.{name}": layer._rows(table, ids.to(table.device)).detach()
        for lname, layer in model.adapter_layers.items()
        for name, table in layer.user_parameters.items()
    }


@torch.no_grad()
def detach_learner(model, learner: int) -> None:
    """End the learner: users' rows go back to ``T̄ + Δ_u``; the population's row of every
    table, with the shared tensors as trained, becomes ``model.population``; the row and the
    name leave the model."""
    if model.users.names[learner:] != [LEARNER] or model.router.base_row != learner:
        raise ValueError(f"user {learner} is not the population learner")
    for table in user_tables(model).values():
        table[learner] /= model.router.base_scale
        table[:learner] += table[learner]
    model.router.base_row, model.router.base_scale = None, 1.0
    model.population = from_row(model, learner)
    for layer in model.adapter_layers.values():
        for name, table in layer.user_parameters.items():
            kept = torch.nn.Parameter(table[:learner].clone(), table.requires_grad)
            setattr(layer, name, kept)
    model.users.truncate(learner)
    model.router.num_users = learner


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
    tables = user_tables(model)
    for name, tensor in model.trainable_state_dict().items():
        base = population[name].to(tensor).expand_as(tensor)
        w = weight
        if user_weight is not None and name in tables:
            w = user_weight.to(tensor).view(-1, *[1] * (tensor.dim() - 1))
        tensor.copy_(torch.lerp(base, personal[name].to(tensor), w))


def deviation_penalty(
    model,
    pair_users: torch.Tensor,
    counts: torch.Tensor,
    on: str = "factors",
    center: dict[str, torch.Tensor] | None = None,
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
        center: the population's rows by name (default ``model.population``): the learner's
            rows while the population trains (``learner_rows``).
    """
    rows = model.population if center is None else center
    users, in_batch = pair_users.unique(return_counts=True)  # [k], [k]
    weight = in_batch / (len(pair_users) * counts[users].clamp(min=1))  # [k]
    total = torch.zeros((), device=pair_users.device)
    for name, layer in model.adapter_layers.items():
        center = {p: rows[f"{name}.{p}"] for p in layer.user_parameters}
        sq = layer.deviation_sq(users, center, weights=on == "weights")  # [k]
        total = total + (weight.to(sq) * sq).sum()
    return total / 2

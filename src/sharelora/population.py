"""The population model: the one reward every user shares before personalizing.

It has one meaning everywhere: a dict of the model's trainable tensors (adapters and head) by
name, in which each per-user table holds a single row ``[1, ...]`` standing for every user. It
is

- where personal training starts (``assign`` copies it into every user's rows),
- what the personalization strength shrinks toward (``sharelora.strength``: γ = 0 gives every
  user the population),
- where a new user starts (``PersonalizedRewardModel.add_users``, onboarding), and
- the reward of a user the model does not know (``--unknown-user population``).

It comes from, in this order: a trained ``shared`` model (``from_shared``), the end of the
shared warm-up (``from_row``: the row every user was routed to), else the mean over users of
each per-user table (``mean_of``). Training stores the first two on the model
(``model.population``), which saves them as ``population.safetensors`` beside the adapters;
``of(model)`` falls back to the mean.
"""

from __future__ import annotations

import torch


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
def from_shared(model, shared) -> dict[str, torch.Tensor]:
    """The population of ``model`` that scores every user exactly as the trained ``shared``
    model does: each per-user factor gets the shared factor, a core ``C_u`` the identity and a
    ``d_u`` ones; the head is the shared model's."""
    if shared.adapter_config.method != "shared":
        raise ValueError(
            f"the population comes from a model trained with method 'shared', got "
            f"{shared.adapter_config.method!r}"
        )
    source = shared.trainable_state_dict()
    out = from_row(model)  # names and shapes; every value below is overwritten
    for name, layer in model.adapter_layers.items():
        if getattr(layer, "is_head", False):
            out[f"{name}.user_W"].zero_()  # the shared head alone: no offset
            continue
        for key in ("A", "B"):
            target = f"{name}.user_{key}" if hasattr(layer, f"user_{key}") else f"{name}.lora_{key}"
            src = source.get(f"{name}.lora_{key}")
            if src is None or src.shape != out[target].shape[-src.dim() :]:
                raise ValueError(
                    f"the shared model does not match this one at {name}.lora_{key} (same "
                    "backbone, rank, targets and top_layers are needed)"
                )
            out[target] = src.reshape(out[target].shape).clone()
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
def lerp(model, population: dict, personal: dict, weight: float) -> None:
    """Set the model to ``population + weight · (personal − population)``, tensor by tensor,
    on each tensor's own device (the population may have been taken on another)."""
    for name, tensor in model.trainable_state_dict().items():
        base = population[name].to(tensor).expand_as(tensor)
        tensor.copy_(torch.lerp(base, personal[name].to(tensor), weight))

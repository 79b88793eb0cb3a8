"""Attach ``PersonalLoRALayer`` to the target modules of any transformers model."""

from __future__ import annotations

import torch.nn as nn
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers.pytorch_utils import Conv1D

from .adapters import AdapterConfig, PersonalLoRALayer, UserRouter

ADAPTABLE = (nn.Linear, Conv1D)


def default_targets(model: nn.Module) -> list[str]:
    """The architecture's usual LoRA targets: PEFT's table (``query,value`` for BERT,
    ``q_proj,v_proj`` for Llama and GPT-J, ``c_attn`` for GPT-2, ...)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if not targets:
        raise ValueError(
            f"no default target modules for model type {model_type!r}; pass targets explicitly, "
            f"e.g. --targets q_proj,v_proj. Linear layers in this model: "
            f"{', '.join(linear_suffixes(model))}"
        )
    return list(targets)


def head_module_names(model: nn.Module) -> list[str]:
    """Top-level children outside the transformer body: the sequence-classification head.

    transformers models keep the body under ``base_model_prefix`` (``bert``, ``model``,
    ``transformer``); whatever else sits at the top (``classifier``, ``score``) is the head.
    """
    body = getattr(model, "base_model_prefix", None)
    return [
        name
        for name, child in model.named_children()
        if name != body and any(True for _ in child.parameters())
    ]


def score_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """``(name, layer)`` of the linear layer that writes the score: the head itself
    (``classifier``, ``score``) or the last linear layer inside it (RoBERTa's ``out_proj``)."""
    for head in head_module_names(model):
        linears = [
            (f"{head}.{n}" if n else head, m)
            for n, m in model.get_submodule(head).named_modules()
            if isinstance(m, nn.Linear)
        ]
        if linears:
            return linears[-1]
    raise ValueError(f"{type(model).__name__} has no linear score head for the head method")


def linear_suffixes(model: nn.Module) -> list[str]:
    """Distinct last name components of the adaptable layers, for error messages."""
    seen = dict.fromkeys(
        name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, ADAPTABLE)
    )
    return sorted(seen)


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of transformer blocks (``bert.encoder.layer``, ``model.layers``, ...): the
    longest ``nn.ModuleList`` that holds linear layers."""
    best = None
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > 0
            and any(isinstance(m, ADAPTABLE) for m in module.modules())
            and (best is None or len(module) > len(best[1]))
        ):
            best = (name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no stack of transformer blocks")
    return best


def block_of(name: str, blocks_path: str) -> int | None:
    """Index of the block that holds module ``name``, or ``None`` outside the stack."""
    prefix = blocks_path + "."
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix) :].split(".", 1)[0])


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def find_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the adaptable modules whose name ends with one of ``targets``.

    Modules of the head are never targets: the head trains in full. Raises ``ValueError``
    listing the model's linear-layer names when a target matches nothing.
    """
    heads = head_module_names(model)
    found, used = [], set()
    for name, module in model.named_modules():
        if any(name == h or name.startswith(h + ".") for h in heads):
            continue
        hits = [t for t in targets if _matches(name, t)]
        if hits and isinstance(module, ADAPTABLE):
            found.append(name)
            used.update(hits)
    unused = [t for t in targets if t not in used]
    if unused:
        raise ValueError(
            f"target module(s) {', '.join(unused)} match no nn.Linear/Conv1D layer of "
            f"{type(model).__name__}; its linear layers are named: "
            f"{', '.join(linear_suffixes(model))}"
        )
    return found


def inject_adapters(
    model: nn.Module, config: AdapterConfig, num_users: int, router: UserRouter
) -> dict[str, PersonalLoRALayer]:
    """Replace every target module of ``model`` in place by a ``PersonalLoRALayer``.

    Returns the new layers by module name. ``config.targets`` of ``None`` is resolved to the
    architecture's default and written back into ``config``.
    """
    if config.targets is None:
        config.targets = default_targets(model)
    names = find_targets(model, config.targets)
    if config.top_layers is not None:
        path, blocks = transformer_blocks(model)
        if config.top_layers > len(blocks):
            raise ValueError(
                f"top_layers={config.top_layers} but the model has {len(blocks)} blocks"
            )
        first = len(blocks) - config.top_layers
        names = [n for n in names if (block_of(n, path) or 0) >= first]
    layers = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = PersonalLoRALayer(getattr(parent, child), config, num_users, router)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers

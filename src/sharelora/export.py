"""Per-user exports: a merged plain transformers model, or a standard PEFT LoRA adapter.

Free functions over a ``PersonalizedRewardModel`` (the model does not import this module)::

    export_user(model, "bob", "rm-bob", format="merged")
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from peft import LoraConfig
from safetensors.torch import save_file

if TYPE_CHECKING:
    from .model import PersonalizedRewardModel

# PEFT prefixes every tensor of a task model with this in adapter_model.safetensors.
PEFT_PREFIX = "base_model.model."


def _provenance(model: PersonalizedRewardModel, user, fmt: str) -> dict:
    return {
        "exported_by": "sharelora",
        "format": fmt,
        "user": None if user is None else str(user),
        "method": model.adapter_config.method,
        "backbone": model.backbone_name,
        "revision": model.revision,
    }


def export_user(model: PersonalizedRewardModel, user, directory, format: str = "merged") -> None:
    """Write one user's reward model as a plain transformers (``merged``) or PEFT directory."""
    exporters = {"merged": export_merged, "peft": export_peft}
    if format not in exporters:
        raise ValueError(f"unknown export format {format!r}; choose merged or peft")
    exporters[format](model, user, Path(directory))


@contextlib.contextmanager
def merged_backbone(model: PersonalizedRewardModel, user):
    """The backbone with ``W0 + s·ΔW_u`` fused into plain layers, for the ``with`` block.

    Only the adapted layers are copied; the adapters are put back on exit.
    """
    uid = model.user_index(user)
    originals = {}
    try:
        for name, layer in model.adapter_layers.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.backbone.get_submodule(parent_name)
            # The module in place: the adapter layer, or the hooked head for ``head``.
            originals[name] = (parent, child, getattr(parent, child))
            setattr(parent, child, layer.merged_base(uid))
        yield model.backbone
    finally:
        for parent, child, module in originals.values():
            setattr(parent, child, module)


def export_merged(model: PersonalizedRewardModel, user, directory: Path) -> None:
    """``W0 + s·ΔW_u`` fused: ``AutoModelForSequenceClassification.from_pretrained(directory)``
    loads it with no sharelora installed and zero adapter overhead."""
    directory.mkdir(parents=True, exist_ok=True)
    with merged_backbone(model, user) as plain:
        plain.save_pretrained(directory)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(directory)
    (directory / "sharelora_export.json").write_text(
        json.dumps(_provenance(model, user, "merged"), indent=1)
    )


def export_peft(model: PersonalizedRewardModel, user, directory: Path) -> None:
    """A standard PEFT LoRA adapter for one user: ``PeftModel.from_pretrained(base, directory)``.

    Each layer's effective factors (``A_u, B`` for sharelora, ``C_u·A, B`` for core, ...) become
    ``lora_A``/``lora_B``; the trained head (for ``head``: ``w̄ + δ_u``) goes in
    ``modules_to_save``.
    """
    uid = model.user_index(user)
    cfg = model.adapter_config
    layers = {n: m for n, m in model.adapter_layers.items() if not m.is_head}
    # The head method's w̄ + δ_u is this user's head: it goes in modules_to_save.
    head_deltas = {
        f"{n}.weight": m.delta_weight(uid) for n, m in model.adapter_layers.items() if m.is_head
    }
    heads = sorted({n.rsplit(".", 1)[0] for n in model.trainable_backbone_names})
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=sorted(layers),
        fan_in_fan_out=all(layer.fan_in_fan_out for layer in layers.values()),
        modules_to_save=heads,
        task_type="SEQ_CLS",
        base_model_name_or_path=model.backbone_name,
        revision=model.revision,
    )
    directory.mkdir(parents=True, exist_ok=True)
    lora.save_pretrained(directory)
    tensors = {}
    for name, layer in layers.items():
        a, b = layer.effective_factors(uid)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous().cpu()
    params = dict(model.backbone.named_parameters())
    for name in model.trainable_backbone_names:
        tensor = params[name].detach()
        if name in head_deltas:
            tensor = (tensor.to(head_deltas[name]) + head_deltas[name]).to(tensor.dtype)
        tensors[f"{PEFT_PREFIX}{name}"] = tensor.contiguous().cpu()
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(directory)
    (directory / "sharelora_export.json").write_text(
        json.dumps(_provenance(model, user, "peft"), indent=1)
    )

"""sharelora: personalized reward models with P-ShareLoRA (shared B, per-user A_u).

The names below load on first use, so ``import sharelora.cli`` (and ``sharelora --help``) does
not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib

from .config import DEFAULT_BACKBONE, METHODS, AdapterConfig, TrainConfig

__version__ = "0.1.0"

# name -> module that defines it (imported when the name is first read)
_LAZY = {
    "PersonalLoRALayer": "adapters",
    "UserRouter": "adapters",
    "ModelFormatError": "model",
    "PersonalizedRewardModel": "model",
    "PersonalAdamW": "optim",
    "build_optimizer": "optim",
    "UserVocab": "users",
}

__all__ = ["DEFAULT_BACKBONE", "METHODS", "AdapterConfig", "TrainConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sharelora' has no attribute {name!r}")

"""sharelora: personalized reward models with P-ShareLoRA (shared B, per-user A_u)."""

from .adapters import METHODS, AdapterConfig, PersonalLoRALayer, UserRouter
from .backbone import DEFAULT_BACKBONE
from .model import ModelFormatError, PersonalizedRewardModel
from .optim import PersonalAdamW, build_optimizer
from .users import UserVocab

__version__ = "0.1.0"
__all__ = [
    "METHODS",
    "AdapterConfig",
    "DEFAULT_BACKBONE",
    "ModelFormatError",
    "PersonalAdamW",
    "PersonalLoRALayer",
    "PersonalizedRewardModel",
    "UserRouter",
    "UserVocab",
    "build_optimizer",
]

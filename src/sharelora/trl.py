"""A per-user reward for TRL's GRPO trainer (``reward_funcs``); TRL itself stays optional."""

from __future__ import annotations

from .model import PersonalizedRewardModel
from .score import score_texts


def reward_function(model_dir: str, batch_size: int = 32, device: str | None = None):
    """Load a trained model and return ``f(prompts, completions, user, **kwargs) -> list[float]``.

    That is the calling convention of ``GRPOTrainer(reward_funcs=[f])``: every extra dataset
    column arrives as a keyword argument, so the dataset needs a ``user`` column. Conversational
    prompts and completions (lists of ``{"role", "content"}`` messages) are joined to text.
    """
    model = PersonalizedRewardModel.from_pretrained(model_dir).eval()
    if device is not None:
        model.to(device)

    def as_text(x) -> str:
        if isinstance(x, str):
            return x
        return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in x)

    def reward(prompts, completions, user, **kwargs) -> list[float]:
        users = [user] * len(completions) if isinstance(user, (str, int)) else list(user)
        return score_texts(
            model,
            [as_text(p) for p in prompts],
            [as_text(c) for c in completions],
            users,
            batch_size,
        )

    reward.__name__ = f"sharelora_{model.adapter_config.method}"
    return reward

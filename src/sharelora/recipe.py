"""One training run, top to bottom (torchtune's recipe shape)::

    splits = read_split(data, split)                 the rows, per user, seeded
    with the output lock, deterministic kernels:
        shared start  (OUTPUT/shared)                when a personalized run starts from shared
        model = build_model(...)                     the seed set once, for the initial draw
        fit(model, splits, cfg)                      choose on validation, then refit:
            for τ in the prior's grid: Trainer(...)    the choosing run(s): OUTPUT/select/
            Trainer(...) on every non-test pair        the refit with those choices: OUTPUT
        test_metrics(model, splits)                  OUTPUT/metrics.json

``train`` (the library's entry) is ``fit`` under the lock; ``run`` is the command ``train``;
``compare``, ``onboard`` and ``fewshot`` build their models with ``build_model`` and train
them with ``train``.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .config import (
    PRIOR_GRID,
    AdapterConfig,
    DataConfig,
    RunConfig,
    SplitConfig,
    TrainConfig,
    UsageError,
)
from .data import (
    Columns,
    Comparison,
    Splits,
    read_preferences,
    seen_share,
    split_per_user,
    validation_warning,
)
from .determinism import deterministic_mode
from .evaluate import evaluate
from .files import clear_run_state, run_lock, write_json
from .flags import Configs
from .model import PersonalizedRewardModel
from .prior import search_prior
from .shard import checkpoints, is_main_process, plan, save
from .train import Trainer


def _log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- read/split
def read(data: DataConfig, source: str | None = None, log=_log) -> list[Comparison]:
    """The comparisons of ``data.data`` (or of another file, ``source``, with the same
    columns; a split column is the main data's alone)."""
    columns = Columns(
        data.prompt_col,
        data.chosen_col,
        data.rejected_col,
        data.user_col,
        data.group_col,
        None if source else data.split_col,
    )
    rows, report = read_preferences(source or data.data, columns, data.on_bad_rows, data.hf_split)
    log(report.summary())
    return rows


def read_split(data: DataConfig, split: SplitConfig, log=_log) -> Splits:
    """The rows split per user; a ``test_data`` file is the test, and when its texts are
    mostly new, validation is carved by text too (it asks the test's question)."""
    rows = read(data, log=log)
    if data.test_data:
        test_rows = read(data, data.test_data, log)
        auto = split.val_by == "auto" and seen_share(test_rows, rows) <= 0.5
        split = replace(split, test=0.0, val_by="text" if auto else split.val_by)
    splits = split_per_user(rows, split)
    if data.test_data:
        known = set(splits.users)
        splits.test = [c for c in test_rows if c.user in known]
        untrained = len(test_rows) - len(splits.test)
        if untrained:
            log(f"{data.test_data}: {untrained} test rows of users not trained")
    dropped = splits.manifest["dropped_without_training_rows"]
    if dropped:
        log(
            f"split: dropped {len(dropped)} user(s) whose every group fell in val/test (no "
            f"training row): {', '.join(list(dropped)[:5])}"
        )
    log(
        f"split: {len(splits.users)} users; train {len(splits.train)}, val {len(splits.val)} "
        f"(by {splits.manifest['val_by']}), test {len(splits.test)} comparisons"
    )
    warning = validation_warning(splits)
    if warning:
        log(f"warning: {warning}")
    return splits


# ------------------------------------------------------------------------------- build
def build_model(
    run: RunConfig, users: list[str], adapter: AdapterConfig, cfg: TrainConfig, log=None
):
    """A fresh model over ``run.backbone``; the adapters' initial draw is part of the seed."""
    torch.manual_seed(cfg.seed)
    model = PersonalizedRewardModel.from_backbone(
        run.backbone,
        users,
        adapter,
        revision=run.revision,
        trust_remote_code=run.trust_remote_code,
        max_length=cfg.max_length,
    )
    if log:
        log(f"parameters: {json.dumps(model.parameter_report())}; score head {model.head_init}")
    return model


# --------------------------------------------------------------------------------- fit
def _choose(model, train_data, val_data, cfg, out, resume, cache, scale=None, shard=None):
    """One run, or with ``prior="auto"`` one run per τ of the grid (``prior.search_prior``)."""
    if cfg.prior == "auto":
        if resume:
            raise ValueError("--resume continues one run; with --prior auto start afresh")
        return search_prior(model, train_data, val_data, cfg, out, cache, shard)
    return Trainer(model, train_data, val_data, cfg, out, resume, cache, scale, shard).run()


def fit(
    model,
    train_data,
    val_data,
    cfg,
    output_dir=None,
    resume=False,
    cache=None,
    refit_data=None,
    shard=None,
    select_from=None,
):
    """Train ``model`` in place; with validation, ``refit_data`` and ``cfg.refit``, choose on
    ``train_data``/``val_data`` (in ``OUTPUT/select/``), then train again from
    ``cfg.init_from`` on ``refit_data`` with the choices made: the epochs (``select_best``),
    the prior's τ (``prior="auto"``) and the strength's scale. ``select_from``: the choosing
    run's start in place of ``cfg.init_from``, when that start was itself refitted on
    validation's pairs (its own ``select/``): a start that saw them would be scored on pairs
    it trained on. ``shard`` (``sharelora.shard.plan``): the model holds this process's
    users, and every run trains them on their pairs. Returns ``{"summary", "val_metrics",
    "prefix_cache"}``."""
    personalized = model.adapter_config.personalized
    if cfg.prior == "auto" and not personalized:
        cfg = replace(cfg, prior=0.0)  # no user deviations to hold back
    if not val_data and personalized and "auto" in (cfg.prior, cfg.strength):
        # Nothing to choose on: each "auto" is its default, said once rather than quietly.
        warnings.warn(
            "no validation pairs: --prior auto trains at the default "
            f"{PRIOR_GRID[0]:g} and --strength auto keeps every user as trained (pass --val "
            "0.1 to choose them, or numbers to fix them)",
            stacklevel=2,
        )
        if cfg.prior == "auto":
            cfg = replace(cfg, prior=PRIOR_GRID[0])
    if not (cfg.refit and val_data and refit_data):
        return _choose(model, train_data, val_data, cfg, output_dir, resume, cache, None, shard)
    from .strength import snapshot

    start, start_population = snapshot(model), model.population
    out = Path(output_dir) if output_dir is not None else None
    select = out / "select" if out is not None else None
    done = select is not None and resume and (select / "sharelora.json").exists()
    if done:  # --resume after the choosing run finished: its choices are on disk
        chosen = json.loads((select / "sharelora.json").read_text())["training"]
        val_metrics = json.loads((select / "val_metrics.json").read_text())
    else:
        if out is not None and is_main_process():
            clear_run_state(out)  # the choosing run is not resumed from OUTPUT's checkpoints
        choosing = replace(cfg, init_from=str(select_from)) if select_from else cfg
        run = _choose(model, train_data, val_data, choosing, select, resume, cache, None, shard)
        chosen, val_metrics, cache = run["summary"], run["val_metrics"], run["prefix_cache"]
    model.set_trainable(start)
    model.population = start_population
    scale = None  # a fixed strength is the config's; "auto" repeats the chosen κ / median n
    if cfg.strength == "auto":
        scale = 1 / chosen["strength"] - 1 if chosen["strength"] else math.inf
        if chosen["served"] == "population" and chosen.get("fallback") == "start":
            scale = "start"  # the refit serves the shared model it started from
    refit = replace(
        cfg,
        epochs=chosen["best_epochs"] if cfg.select_best else cfg.epochs,
        prior=chosen["prior"],
        select_best=False,
    )
    again = resume and done and (checkpoints(out, shard) / "last").exists()
    if scale == "start":  # serving the start needs no training: finish without a step
        run = Trainer(model, refit_data, None, refit, out, False, cache, scale, shard).finish()
    else:
        run = _choose(model, refit_data, None, refit, out, again, cache, scale, shard)
    summary = {
        **run["summary"],
        "config": asdict(cfg),
        "validation": {
            "pairs": len(val_data),
            "seen_text_share": seen_share(val_data, train_data),
            "selection_train_pairs": len(train_data),
            "refit_pairs": len(refit_data),
        },
        "select": {k: chosen.get(k) for k in SELECTED},
    }
    if select_from:
        summary["select"]["init_from"] = str(select_from)
    if out is not None:
        save(model, out, summary, shard, val_metrics)
    return {**run, "summary": summary, "val_metrics": val_metrics}


# What the choosing run of a refit decided, kept in the refit's summary.
SELECTED = (
    "best_epochs",
    "prior",
    "prior_search",
    "strength",
    "served",
    "fallback",
    "shrinkage_val",
    "gate",
)


def train(
    model,
    train_data: list[Comparison],
    val_data: list[Comparison] | None = None,
    config: TrainConfig | None = None,
    output_dir: str | Path | None = None,
    resume: bool = False,
    prefix_cache=None,
    refit_data: list[Comparison] | None = None,
    shard=None,
    select_from: str | Path | None = None,
) -> dict:
    """Train ``model`` in place with the Bradley-Terry loss (``fit``) under the output's lock;
    returns ``{"summary", "val_metrics", "prefix_cache"}``.

    With ``output_dir`` it writes ``train_log.jsonl``, checkpoints (``checkpoints/last`` every
    epoch, ``checkpoints/best`` on validation), the final model (the best on validation when
    there is one) and, with validation data, ``val_metrics.json``. ``resume`` continues from
    ``checkpoints/last`` exactly: weights, optimizer, schedule, RNG and data position.
    ``shard`` (``sharelora.shard.plan``, under several processes): ``model`` holds this
    process's users (``shard.local_users``), and the data is every user's. ``select_from``:
    the choosing run's start (``fit``; ``start_of`` gives it for a shared start).
    """
    config = config or TrainConfig()
    # The lock: two runs writing one directory would corrupt it.
    with run_lock(output_dir), deterministic_mode(config.deterministic):
        return fit(
            model,
            train_data,
            val_data,
            config,
            output_dir,
            resume,
            prefix_cache,
            refit_data,
            shard,
            select_from,
        )


def start_of(shared: Path) -> Path | None:
    """The start a choosing run takes from the shared model in ``shared``, trained on the same
    split: its own choosing run (``shared/select``), which never saw a validation pair, when it
    was refitted on them; else ``None`` (``shared`` itself is that start)."""
    select = Path(shared) / "select"
    return select if (select / "sharelora.json").exists() else None


# -------------------------------------------------------------------------------- test
def test_metrics(model, splits: Splits, cfg: TrainConfig, cache=None, shard=None) -> dict:
    """Per-user metrics on the test split (validation when there is none)."""
    test = splits.test or splits.val
    split = "test" if splits.test else "val"
    return evaluate(model, test, split=split, seed=cfg.seed, prefix_cache=cache, shard=shard)


# --------------------------------------------------------------------------------- run
def run(c: Configs, log=_log) -> dict:
    """The command ``train``: one model in ``c.run.output``, tested on the test split."""
    cfg, out = c.train, Path(c.run.output)
    if c.run.from_shared and cfg.init_from:
        raise UsageError("--init-from starts from a shared model already: drop --from-shared")
    from_shared = not cfg.init_from if c.run.from_shared is None else c.run.from_shared
    splits = read_split(c.data, c.split, log)
    select_from = None  # the choosing run's start, where it is not cfg.init_from
    with run_lock(out), deterministic_mode(cfg.deterministic):
        if is_main_process():  # one writer under a launcher
            splits.write_manifest(out / "split.json")
        if from_shared and c.adapter.personalized:
            # The shared model first, on the same split: every user starts from it, and it is
            # a fallback validation can choose (the population trained from it is the other).
            shared = out / "shared"
            if not (c.run.resume and (shared / "sharelora.json").exists()):
                log(f"training the shared model every user starts from -> {shared}")
                start = build_model(
                    c.run, splits.users, replace(c.adapter, method="shared"), cfg, log
                )
                fit(start, splits.train, splits.val, cfg, shared, c.run.resume, None, splits.refit)
            cfg = replace(cfg, init_from=str(shared))
            select_from = start_of(shared)
        # Several processes: each holds its own users (sharelora.shard).
        shard = plan(splits.users, splits.train, c.adapter.personalized, cfg.shard_users)
        users = splits.users if shard is None else shard.local_users(splits.users)
        if shard is not None:
            log(f"process {shard.rank}: {len(users)} of {len(splits.users)} users")
        model = build_model(c.run, users, c.adapter, cfg, log)
        resume, refit = c.run.resume, splits.refit
        result = fit(
            model, splits.train, splits.val, cfg, out, resume, None, refit, shard, select_from
        )
        metrics = None
        if splits.test:
            metrics = test_metrics(model, splits, cfg, result["prefix_cache"], shard)
            if is_main_process():
                write_json(out / "metrics.json", metrics)
    return {**result, "metrics": metrics}

"""The per-cell, resumable compare grid of the real-data benchmarks (Jester, LLMFAO).

A cell is (protocol, K, n, seed, method); each finished cell is stored in a JSON file and
skipped on the next run, so a grid can run across sessions. Within one (protocol, n, seed) the
methods run through ``sharelora.compare`` on one split, every personalized method starting from
that split's ``shared`` model (``from_shared``) and the compute control ``shared+from-shared``
beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import grid_table, mean_sd

from sharelora import DEFAULT_BACKBONE, AdapterConfig
from sharelora.compare import compare
from sharelora.config import FACTORINGS, PRIOR_ON, STRENGTH_RULES
from sharelora.fields import number_or_auto
from sharelora.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
# The setting of every cell: MiniLM, adapters in the top block (frozen blocks cached).
ADAPTER = AdapterConfig(rank=8, alpha=16, targets=["query", "value"], top_layers=1)
ROW_KEYS = ("protocol", "method", "n", "seed", "macro_accuracy", "micro_accuracy")
METHODS = ",".join(
    ["shared", "shared+from-shared", "independent", "sharelora", "sharelora-head"]
    + ["sharelora+unpooled", "head", "core", "diag"]
)
QUICK_METHODS = "shared,shared+from-shared,sharelora,head"


def parser(doc: str, data: Path, name: str, n: str) -> argparse.ArgumentParser:
    """The flags every real-data grid takes; ``--quick`` and the rest are the caller's."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--data", default=str(data))
    p.add_argument("--n", default=n)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=METHODS)
    defaults = TrainConfig()  # the library's defaults, the one place they are written
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the pairs")
    p.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    p.add_argument(
        "--rank",
        type=int,
        default=ADAPTER.rank,
        help="every method's rank (alpha = 2 * rank, so alpha/r stays 2); other than 8, pass a "
        "--json of its own (e.g. NAME_rank16.json)",
    )
    p.add_argument(
        "--max-length", type=int, default=defaults.max_length, help="token budget per text"
    )
    add_settings(p, *SETTINGS)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / f"{name}.json"))
    return p


# TrainConfig fields the grids take as flags: (argparse type or choices, what it is, a store
# name for its non-default cells). Each defaults to TrainConfig's value; a cell run at another
# value measures something else, so a store refuses to mix such cells with the default's.
SETTINGS = {
    "user_lr_scale": ({"type": float}, "the per-user tables' lr over --lr", "NAME_user_lr1"),
    "prior": (
        {"type": number_or_auto},
        "the training prior's precision on user deviations (auto: chosen on validation)",
        "NAME_prior0",
    ),
    "init_factoring": (
        {"choices": FACTORINGS},
        "how a start from shared factors B A",
        "NAME_orthonormal",
    ),
    "prior_on": ({"choices": PRIOR_ON}, "what the training prior measures", "NAME_prior_weights"),
    "strength_rule": ({"choices": STRENGTH_RULES}, "how strength auto chooses", "NAME_one_se"),
}


def add_settings(p: argparse.ArgumentParser, *names: str) -> None:
    """A flag for each named TrainConfig field of ``SETTINGS``."""
    for name in names:
        kind, what, store = SETTINGS[name]
        p.add_argument(
            "--" + name.replace("_", "-"),
            default=getattr(TrainConfig(), name),
            help=f"{what} (TrainConfig.{name}); other than the default, pass a --json of its "
            f"own (e.g. {store}.json)",
            **kind,
        )


# What stores written before a setting was recorded ran with: --user-lr-scale at 1 (the
# default then), ADAPTER's rank and the shared model's own factors (as-trained); this module's
# stores also ran at TrainConfig's prior, on the factors (the UKP stores record their prior,
# and some of them ran without one).
LEGACY = {"user_lr_scale": 1.0, "rank": ADAPTER.rank, "init_factoring": "as-trained"}
GRID_LEGACY = {**LEGACY, "prior": TrainConfig().prior, "prior_on": "factors"}


def settings_of(store: dict, legacy: dict = LEGACY) -> dict | None:
    """A store's settings, with ``legacy`` for the settings it was written before."""
    settings = store.get("settings")
    return settings and {**legacy, **settings}


def adapter_of(args) -> AdapterConfig:
    """ADAPTER at ``--rank``, with alpha/r held at ADAPTER's so only the capacity changes."""
    scale = ADAPTER.alpha / ADAPTER.rank
    return dataclasses.replace(ADAPTER, rank=args.rank, alpha=scale * args.rank)


def cell_key(protocol: str, k, n, seed: int, method: str) -> str:
    return f"{protocol} K={k} n={n} seed={seed} {method}"


def open_store(path: Path, args) -> dict:
    """The cells stored at ``path``, which must have been run with ``args``' settings."""
    settings = {"epochs": args.epochs, "lr": args.lr, "max_length": args.max_length,
                "top_layers": ADAPTER.top_layers, "from_shared": True,
                "strength_rule": args.strength_rule,
                "user_lr_scale": args.user_lr_scale, "rank": args.rank,
                "prior": args.prior, "prior_on": args.prior_on,
                "init_factoring": args.init_factoring}  # fmt: skip
    store = json.loads(path.read_text()) if path.exists() else {"cells": {}, "settings": settings}
    if settings_of(store, GRID_LEGACY) != settings:
        raise SystemExit(
            f"{path} holds cells run with {store.get('settings')}; pass another --json"
        )
    return store


def run_cell(store: dict, path: Path, protocol: str, k, n, seed: int, methods, splits, args, cache):
    """Train and test the methods of one (protocol, n, seed) not yet in ``store``; returns the
    prefix cache for the next cell of the same protocol and seed."""
    todo = [m for m in methods if cell_key(protocol, k, n, seed, m) not in store["cells"]]
    if not todo:
        return cache
    if "shared" not in todo:
        todo = ["shared", *todo]  # the start of every personalized method
    cfg = TrainConfig(
        epochs=args.epochs, lr=args.lr, max_length=args.max_length, seed=seed,
        group_by_length=True, select_best=False, progress=False,
        strength_rule=args.strength_rule, user_lr_scale=args.user_lr_scale, prior=args.prior,
        prior_on=args.prior_on, init_factoring=args.init_factoring,
    )  # fmt: skip
    started, tag = time.time(), f"{protocol} K={k} n={n} seed={seed}"
    with tempfile.TemporaryDirectory() as tmp:
        results, cache = compare(
            splits, todo, adapter_of(args), cfg, DEFAULT_BACKBONE, tmp,
            log=lambda m: print(f"{tag} {m}", flush=True), prefix_cache=cache, from_shared=True,
        )  # fmt: skip
        diag = json.loads((Path(tmp) / "summary.json").read_text())["diagnostics"]
        # The validation losses behind each chosen strength (and prior), to set against the test.
        training = {
            m: json.loads((Path(tmp) / m / "sharelora.json").read_text())["training"]
            for m in results
        }
    chosen = {m: t.get("select", t) for m, t in training.items()}
    seconds = round((time.time() - started) / len(results), 1)
    for method, metrics in results.items():
        store["cells"][cell_key(protocol, k, n, seed, method)] = {
            "protocol": protocol, "method": method, "n": n, "seed": seed, "K": k,
            "macro_accuracy": metrics["macro_accuracy"],
            "micro_accuracy": metrics["micro_accuracy"],
            "strength": metrics["strength"],
            "shuffled_macro_accuracy": metrics.get("shuffled_macro_accuracy"),
            "room": diag["room"]["rate"],
            "users": {u: v["accuracy"] for u, v in metrics["users"].items()},
            "val_by": splits.manifest["val_by"], "seconds": seconds,
            # A refit repeats the choosing run's choice: its validation losses are the select's.
            "shrinkage_val": chosen[method].get("shrinkage_val", {}),
            "gate": chosen[method].get("gate"),
            "prior": training[method]["prior"],
            "prior_search": training[method].get("prior_search"),
        }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(store, indent=1))
    return cache


def tables(store: dict, methods: list[str], title: str) -> str:
    """Markdown: per protocol, methods × n (macro accuracy mean ± sd over seeds), the strength
    chosen and the shuffled-user control."""
    cells = list(store["cells"].values())
    lines = [f"# {title}: macro test accuracy (mean ± sd over seeds, number of seeds)", ""]
    for protocol in dict.fromkeys(c["protocol"] for c in cells):
        mine = [c for c in cells if c["protocol"] == protocol]
        ns = sorted({c["n"] for c in mine}, key=str)

        def pick(n, method, key, mine=mine):
            return [c[key] for c in mine if c["n"] == n and c["method"] == method]

        def accuracy(n, method):
            runs = pick(n, method, "macro_accuracy")
            return mean_sd(runs) if runs else "—"

        def strength(n, method):
            if method.startswith("shared"):
                return "—"  # one reward for everyone: nothing to shrink
            runs = pick(n, method, "strength")
            return f"{statistics.mean(runs):.2f}" if runs else "—"

        def shuffled(n, method):
            runs = [r for r in pick(n, method, "shuffled_macro_accuracy") if r is not None]
            return f"{statistics.mean(runs):.3f}" if runs else "—"

        room = statistics.mean(c["room"] for c in mine if c.get("room") is not None)
        lines += grid_table(f"## {protocol}, K={mine[0]['K']}", ns, methods, accuracy)
        lines += [f"Room for personalization: users disagree on {room:.0%} of shared pairs.", ""]
        lines += grid_table("Strength chosen (the median user's γ)", ns, methods, strength)
        lines += grid_table("Shuffled-user control (macro accuracy)", ns, methods, shuffled)
    return "\n".join(lines)


def finish(store: dict, path: Path, title: str, started: float) -> None:
    text = tables(store, METHODS.split(","), title)
    path.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(json.dumps([{k: c[k] for k in ROW_KEYS} for c in store["cells"].values()]))
    print(f"finished in {time.time() - started:.0f}s; cells in {path}, tables in .md")

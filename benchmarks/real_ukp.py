"""Real per-worker preferences (UKPConvArg1): every method against per-user sample size n.

Protocol (shared/data/ukp-convarg1/README.md): the K workers with the most judgements; split
by pair_id (test 20%, and a validation 10% carved from the rest for checkpoint selection, the
same way for every method); the first n of each worker's training comparisons after a seeded
shuffle; macro and micro test accuracy, mean ± sd over seeds. MiniLM, adapters in the top
block with the frozen blocks cached (``--top-layers``), one cache per (K, seed) shared by every
method and n.

Runs in sections and resumes: every finished cell (K, n, seed, method) is stored in the JSON
and skipped on the next run.

    python benchmarks/real_ukp.py [--quick] [--k 20,5] [--n 25,50,100,all] [--seeds 0,1,2]
                                  [--methods ...] [--json FILE]

It writes FILE (default benchmarks/results/real_ukp.json), FILE.md (tables) and FILE.png (plot);
``ukp_report.py`` rebuilds the last two from the JSON alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from real_grid import ADAPTER, add_settings, settings_of
from ukp_report import METHODS, report

from sharelora import DEFAULT_BACKBONE
from sharelora.backbone import load_backbone
from sharelora.compare import compare
from sharelora.data import Columns, SplitConfig, read_preferences, split_per_user
from sharelora.pooled import first_token_block
from sharelora.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ukp-convarg1" / "pairs.jsonl.gz"


def args_():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="K=5, n=25,50, one seed, 3 methods")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--k", default="20,5")
    p.add_argument("--n", default="25,50,100,all")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--top-layers", type=int, default=1)
    defaults = TrainConfig()  # the library's defaults, the one place they are written
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--max-length", type=int, default=defaults.max_length)
    # Its stores do not record prior_on: every UKP cell ran on the factors.
    add_settings(p, "user_lr_scale", "prior", "init_factoring", "strength_rule")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "real_ukp.json"))
    args = p.parse_args()
    if args.quick:
        args.k, args.n, args.seeds, args.methods = "5", "25,50", "0", "shared,independent,sharelora"
    return args


def cell_key(k, n, seed, method) -> str:
    return f"K={k} n={n} seed={seed} {method}"


def run(args) -> dict:
    path = Path(args.json)
    adapter = dataclasses.replace(ADAPTER, top_layers=args.top_layers)
    settings = {
        "epochs": args.epochs,
        "lr": args.lr,
        "max_length": args.max_length,
        "top_layers": args.top_layers,
        "from_shared": True,
        "select_best": False,
        "strength": "auto",
        # Cells before the prior and the ranking-loss shrinkage (real_ukp.json) lack these.
        "prior": args.prior,
        "shrinkage_by": "calibrated_loss",
        "strength_rule": args.strength_rule,
        "user_lr_scale": args.user_lr_scale,
        "rank": adapter.rank,
        "init_factoring": args.init_factoring,
    }
    store = json.loads(path.read_text()) if path.exists() else {"cells": {}, "settings": settings}
    if settings_of(store) != settings:
        raise SystemExit(
            f"{path} holds cells run with {store.get('settings')}; these are "
            f"{settings}: pass another --json to keep them apart"
        )
    data, report = read_preferences(args.data, Columns(group="pair_id"), on_bad_rows="skip")
    print(report.summary(), flush=True)
    # Recorded per cell: cells timed before the top block ran at position 0 only (about 5x
    # slower) must not set the grid's time estimate (ukp_report.timing).
    first_token = first_token_block(load_backbone(DEFAULT_BACKBONE)[0]) is not None
    methods = args.methods.split(",")
    for k in map(int, args.k.split(",")):
        for seed in map(int, args.seeds.split(",")):
            cache = None
            for n in args.n.split(","):
                todo = [m for m in methods if cell_key(k, n, seed, m) not in store["cells"]]
                if not todo:
                    continue
                # Methods other than +warmup start from this cell's shared model: train it
                # again when one of them is still to run.
                if any(m != "shared" and not m.endswith("+warmup") for m in todo):
                    todo = ["shared"] + [m for m in todo if m != "shared"]
                cap = None if n == "all" else int(n)
                splits = split_per_user(
                    data, SplitConfig(val=0.1, test=0.2, seed=seed, top_users=k, max_per_user=cap)
                )
                cfg = TrainConfig(
                    epochs=args.epochs,
                    lr=args.lr,
                    max_length=args.max_length,
                    seed=seed,
                    group_by_length=True,
                    select_best=False,
                    progress=False,
                    strength_rule=args.strength_rule,
                    user_lr_scale=args.user_lr_scale,
                    prior=args.prior,
                    init_factoring=args.init_factoring,
                )
                started = time.time()
                with tempfile.TemporaryDirectory() as tmp:
                    results, cache = compare(
                        splits,
                        todo,
                        adapter,
                        cfg,
                        DEFAULT_BACKBONE,
                        tmp,
                        log=lambda m, tag=f"K={k} n={n} seed={seed}": print(
                            f"{tag} {m}", flush=True
                        ),
                        prefix_cache=cache,
                        from_shared=True,
                    )
                for method, metrics in results.items():
                    store["cells"][cell_key(k, n, seed, method)] = {
                        "K": k,
                        "n": n,
                        "seed": seed,
                        "method": method,
                        "macro_accuracy": metrics["macro_accuracy"],
                        "micro_accuracy": metrics["micro_accuracy"],
                        "strength": metrics["strength"],
                        "users": {u: v["accuracy"] for u, v in metrics["users"].items()},
                        "train_pairs": len(splits.train),
                        "test_pairs": metrics["n"],
                        "seconds": round((time.time() - started) / len(todo), 1),
                        "first_token": first_token,
                    }
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(store, indent=1))
    return store


if __name__ == "__main__":
    args = args_()
    started = time.time()
    store = run(args)
    path = Path(args.json)
    print(report(store, METHODS.split(","), path.with_suffix(".md"), path.with_suffix(".png")))
    print(f"finished in {time.time() - started:.0f}s; cells in {path}, table in .md, plot in .png")

"""Train several methods on the same data and split; report them side by side."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from .config import AdapterConfig, RunConfig
from .data import Splits
from .diagnostics import baseline_of, diagnostics_text, disagreement, paired_gain, shuffled_users
from .evaluate import evaluate
from .files import write_json, write_text
from .presets import PRESETS
from .recipe import TrainConfig, build_model, start_of, test_metrics, train
from .report import accuracy_table, plot_accuracy


def method_config(name: str, config: TrainConfig) -> tuple[str, TrainConfig, bool | None]:
    """``"sharelora+warmup"`` -> (``"sharelora"``, the config with the preset ``warmup``
    applied, whether the preset starts from this run's shared model (``None``: it does not
    say)); the variants are the presets of ``sharelora.presets`` that apply to compare."""
    base, _, variant = name.partition("+")
    if not variant:
        return base, config, None
    preset = PRESETS.get(variant)
    if preset is None or "compare" not in preset.commands:
        known = [n for n, p in PRESETS.items() if "compare" in p.commands and n != "default"]
        raise ValueError(
            f"unknown method variant {variant!r} in {name!r}; known: {', '.join(known)}"
        )
    settings = dict(preset.settings)
    from_shared = settings.pop("from_shared", None)
    return base, replace(config, **settings), from_shared


def compare(
    splits: Splits,
    methods: list[str],
    adapter: AdapterConfig,
    config: TrainConfig,
    backbone: str | RunConfig,
    output_dir: str | Path,
    log=print,
    prefix_cache=None,
    from_shared: bool = False,
    freeze_shared: bool = False,
) -> tuple[dict[str, dict], object]:
    """For each method: train on ``splits.train`` (validation: ``splits.val``), evaluate on
    ``splits.test``; writes ``METHOD/`` (model + ``metrics.json``), ``report.md``,
    ``accuracy.png``, ``split.json`` and ``summary.json`` under ``output_dir``.

    A method may carry a variant, a preset (``sharelora.presets``): ``sharelora+warmup`` is
    sharelora trained with the reference two-stage recipe (one shared warm-up epoch). Every
    method starts from the same seed; with
    ``adapter.top_layers`` they share one cache of the frozen blocks, which is returned with
    the per-method metrics so that further calls on the same backbone can reuse it.

    A ``+from-shared`` method starts from this run's ``shared`` model (``TrainConfig.init_from``)
    so that its personalization strength is chosen between the shared model and the personal
    one; ``shared+from-shared`` is the control that trains as long without personalizing.
    ``from_shared`` does this for every personalized method without ``+warmup`` (which keeps its
    own warm-up). ``shared`` then trains first. ``freeze_shared`` makes those methods train
    only their per-user tables (as the ``+frozen`` variant does); the control still trains.
    """
    source = backbone if isinstance(backbone, RunConfig) else RunConfig(backbone=backbone)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits.write_manifest(out / "split.json")
    test = splits.test or splits.val
    if not test:
        raise ValueError("nothing to evaluate on: the split has no test or validation rows")

    def starts_from_shared(method: str) -> bool:
        base, _, start = method_config(method, config)
        plain = base != "shared" and "+" not in method
        return bool(start) or (from_shared and plain)

    if any(map(starts_from_shared, methods)):
        if "shared" not in methods:
            raise ValueError(
                "starting from the shared model (from_shared, +from-shared) needs 'shared' "
                "among the methods: it trains first"
            )
        methods = ["shared"] + [m for m in methods if m != "shared"]
        if "shared+from-shared" not in methods:
            # The compute control: personal methods that start from `shared` train twice as
            # long as it; the gain of training longer is not personalization.
            methods.append("shared+from-shared")
    results, timings, cache = {}, {}, prefix_cache
    for method in methods:
        started = time.time()
        base, cfg, _ = method_config(method, config)
        select_from = None
        if starts_from_shared(method):
            frozen = cfg.freeze_shared or (freeze_shared and base != "shared")
            cfg = replace(cfg, init_from=str(out / "shared"), freeze_shared=frozen)
            select_from = start_of(out / "shared")
        model = build_model(source, splits.users, replace(adapter, method=base), cfg)
        run = train(
            model,
            splits.train,
            splits.val,
            cfg,
            out / method,
            False,
            cache,
            splits.refit,
            select_from=select_from,
        )
        cache = run["prefix_cache"]
        metrics = test_metrics(model, splits, config, cache)
        metrics["strength"] = run["summary"]["strength"]
        metrics["served"] = run["summary"]["served"]
        if model.adapter_config.personalized and len(splits.users) > 1:
            shuffled = evaluate(model, shuffled_users(test, config.seed), prefix_cache=cache)
            metrics["shuffled_macro_accuracy"] = shuffled["macro_accuracy"]
        write_json(out / method / "metrics.json", metrics)
        results[method] = metrics
        timings[method] = round(time.time() - started, 1)
        log(
            f"{method}: macro accuracy {metrics['macro_accuracy']:.3f} "
            f"(micro {metrics['micro_accuracy']:.3f}) in {timings[method]:.0f}s"
        )
    diag = diagnose(results, splits.train + splits.val + test, config.seed)
    table = accuracy_table(results)
    write_text(
        out / "report.md",
        f"# Per-user test accuracy\n\n{table}\n\nA tie counts as half right. Training pairs: "
        f"{len(splits.train)}; test pairs: {len(test)}; users: {len(splits.users)}.\n\n"
        f"{diagnostics_text(diag)}\n",
    )
    plot_accuracy(results, out / "accuracy.png", title="per-user test accuracy")
    write_json(
        out / "summary.json",
        {
            "methods": methods,
            "seconds": timings,
            "macro_accuracy": {m: r["macro_accuracy"] for m, r in results.items()},
            "micro_accuracy": {m: r["micro_accuracy"] for m, r in results.items()},
            "strength": {m: r["strength"] for m, r in results.items()},
            "diagnostics": diag,
        },
    )
    return results, cache


def diagnose(results: dict[str, dict], rows: list, seed: int = 0) -> dict:
    """Room for personalization on ``rows``, and for every method its paired gain over the
    baseline (``diagnostics.baseline_of``) and its shuffled-user accuracy."""
    base = baseline_of(results)
    methods = {}
    for method, metrics in results.items():
        methods[method] = {
            "macro_accuracy": metrics["macro_accuracy"],
            "gain": paired_gain(metrics, results[base], seed=seed) if base else None,
            "shuffled_macro_accuracy": metrics.get("shuffled_macro_accuracy"),
            "served": metrics.get("served"),
        }
    return {"room": disagreement(rows), "baseline": base, "methods": methods}

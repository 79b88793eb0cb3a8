"""Unseen users: accuracy against the number k of their comparisons, for each approach.

* ``METHOD onboarding``, for each personalized method the run trained (``sharelora``,
  ``sharelora-head``, ...): that model, with only the new users' rows fitted on their k
  comparisons (``sharelora.onboard``);
* ``shared``: the trained shared model, zero-shot (it never sees the k comparisons);
* ``independent (fresh)``: a new independent LoRA trained on the k comparisons alone.

Each held-out user's comparisons are shuffled once (seeded); the first k train, and the test
set is the same for every k: the rows after the largest k.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from .config import AdapterConfig, RunConfig
from .data import Comparison
from .evaluate import evaluate
from .files import write_json, write_text
from .model import PersonalizedRewardModel
from .onboard import onboard
from .recipe import TrainConfig, build_model, train

BASELINES = ("shared", "independent (fresh)")


def split_shots(rows: list[Comparison], shots: list[int], seed: int, min_test: int = 10):
    """``{user: (shuffled rows, test rows)}`` for users with at least max(shots)+min_test rows."""
    by_user: dict[str, list[Comparison]] = {}
    for c in rows:
        by_user.setdefault(c.user, []).append(c)
    out, top = {}, max(shots)
    for user, mine in by_user.items():
        mine = list(mine)
        random.Random(f"{seed}:{user}").shuffle(mine)
        if len(mine) >= top + min_test:
            out[user] = (mine[:top], mine[top:])
    if not out:
        raise ValueError(
            f"no held-out user has {top + min_test} comparisons for --shots up to "
            f"{top}; lower --shots or hold out users with more data"
        )
    return out


def fewshot_curves(
    holdout: list[Comparison],
    shots: list[int],
    model_dirs: dict[str, Path],
    backbone: str | RunConfig,
    adapter: AdapterConfig,
    config: TrainConfig,
    output_dir: str | Path,
    log=print,
) -> dict:
    """Accuracy of each approach at each k; writes ``fewshot.json/.md/.png``.

    ``model_dirs`` maps ``shared`` and every personalized method to onboard to its trained
    model's directory."""
    source = backbone if isinstance(backbone, RunConfig) else RunConfig(backbone=backbone)
    out = Path(output_dir)
    personal = [m for m in model_dirs if m != "shared"]
    approaches = [f"{m} onboarding" for m in personal] + list(BASELINES)
    per_user = split_shots(holdout, shots, config.seed)
    test = [c for _, rows in per_user.values() for c in rows]
    shared = PersonalizedRewardModel.from_pretrained(model_dirs["shared"])
    zero_shot = evaluate(shared, test, seed=config.seed)["macro_accuracy"]
    results = {name: {} for name in approaches}
    for k in shots:
        train_rows = [c for rows, _ in per_user.values() for c in rows[:k]]
        cfg = replace(config, progress=False)
        for method in personal:
            model = PersonalizedRewardModel.from_pretrained(model_dirs[method])
            onboard(model, train_rows, None, cfg)
            accuracy = evaluate(model, test, seed=cfg.seed)["macro_accuracy"]
            results[f"{method} onboarding"][k] = accuracy
        results["shared"][k] = zero_shot
        fresh = build_model(source, list(per_user), replace(adapter, method="independent"), cfg)
        train(fresh, train_rows, None, cfg)
        results["independent (fresh)"][k] = evaluate(fresh, test, seed=cfg.seed)["macro_accuracy"]
        log(f"k={k}: " + ", ".join(f"{a} {results[a][k]:.3f}" for a in approaches))
    lines = [
        "| approach | " + " | ".join(f"k={k}" for k in shots) + " |",
        "|---|" + "---:|" * len(shots),
    ]
    for name, by_k in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{by_k[k]:.3f}" for k in shots) + " |")
    table = "\n".join(lines)
    write_text(
        out / "fewshot.md",
        f"# Unseen users: macro test accuracy against k\n\n{table}\n\n"
        f"{len(per_user)} held-out users; {len(test)} test comparisons.\n",
    )
    write_json(
        out / "fewshot.json",
        {
            "shots": shots,
            "users": list(per_user),
            "test_pairs": len(test),
            "macro_accuracy": results,
        },
    )
    _plot(results, shots, out / "fewshot.png")
    return results


def _plot(results: dict, shots: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_k in results.items():
        ax.plot(shots, [by_k[k] for k in shots], marker="o", label=name)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set_xlabel("comparisons from each new user (k)")
    ax.set_ylabel("macro test accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

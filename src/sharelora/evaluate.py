"""Per-user metrics: accuracy (a tie counts half), Bradley-Terry loss, macro and micro averages."""

from __future__ import annotations

import random
from collections import defaultdict

import torch
import torch.nn.functional as F

from .pairs import PairRun, pair_correct
from .prefix import PrefixCache
from .users import UnknownUserError


def summarize(
    users: list[str],
    margins: list[float],
    method: str,
    split: str,
    seed: int = 0,
    bootstrap: int = 1000,
    texts: list[tuple[str, str]] | None = None,
) -> dict:
    """The ``metrics.json`` dict (design §4) from per-pair margins ``r+ − r−``. With each
    pair's ``texts`` (``data.pair_texts``), ``pairs`` also keeps every pair's user, texts and
    calibrated loss, for an error clustered by user and by text (``strength.paired_se``);
    ``shard.save`` leaves it out of ``val_metrics.json``."""
    per_user = defaultdict(lambda: {"correct": 0.0, "loss": 0.0, "calibrated_loss": 0.0, "n": 0})
    m = torch.tensor(margins, dtype=torch.float64)
    credit, losses = pair_correct(m).tolist(), F.softplus(-m).tolist()
    calibrated = calibrated_losses(m)
    for user, c, loss, cal in zip(users, credit, losses, calibrated.tolist(), strict=True):
        s = per_user[user]
        s["correct"] += c
        s["loss"] += loss
        s["calibrated_loss"] += cal
        s["n"] += 1
    table = {
        u: {
            "accuracy": s["correct"] / s["n"],
            "loss": s["loss"] / s["n"],
            "calibrated_loss": s["calibrated_loss"] / s["n"],
            "n": s["n"],
        }
        for u, s in sorted(per_user.items())
    }
    accs = [v["accuracy"] for v in table.values()]
    out = {
        "method": method,
        "split": split,
        "users": table,
        "macro_accuracy": sum(accs) / len(accs) if accs else float("nan"),
        "micro_accuracy": sum(s["correct"] for s in per_user.values()) / max(len(margins), 1),
        "loss": sum(s["loss"] for s in per_user.values()) / max(len(margins), 1),
        "calibrated_loss": calibrated.mean().item() if len(margins) else float("nan"),
        "n": len(margins),
    }
    if accs and bootstrap:
        out["macro_accuracy_ci95"] = bootstrap_ci(accs, seed, bootstrap)
    if texts is not None:
        out["pairs"] = {"users": users, "texts": texts, "calibrated_loss": calibrated.tolist()}
    return out


def calibrated_losses(margins: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """Per-pair Bradley-Terry losses ``[P]`` of ``s · margins`` at the scale ``s >= 0`` that
    makes their mean lowest: the loss of the ranking the margins make, with their over- or
    under-confidence taken out. Convex in ``s``; Newton steps from ``s = 1``, capped at 1e3 (a
    ranking with no error wants ``s → ∞``)."""
    m, s = margins.double(), torch.tensor(1.0, dtype=torch.float64)
    for _ in range(iterations if len(m) else 0):
        p = torch.sigmoid(-s * m)  # [P]: the probability the pair's order is wrong
        grad, hess = (-m * p).mean(), (m * m * p * (1 - p)).mean()
        if hess <= 0:
            break
        s = (s - grad / hess).clamp(0.0, 1e3)
    return F.softplus(-s * m)


def calibrated_loss(margins: torch.Tensor) -> float:
    """The mean of ``calibrated_losses`` (nan without pairs)."""
    return calibrated_losses(margins).mean().item() if len(margins) else float("nan")


def bootstrap_ci(values: list[float], seed: int = 0, rounds: int = 1000) -> list[float]:
    """95% percentile interval of the mean, resampling users with replacement."""
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(rounds))
    return [means[int(0.025 * rounds)], means[min(int(0.975 * rounds), rounds - 1)]]


def _sorted_loader(ds, batch_size: int, accelerator):
    from torch.utils.data import DataLoader

    loader = DataLoader(
        ds,
        batch_size=batch_size,
        # By length: each batch pads to its longest text, so similar lengths waste little.
        sampler=sorted(range(len(ds)), key=ds.lengths().__getitem__),
        collate_fn=ds.collate,
        generator=torch.Generator().manual_seed(0),  # leaves the global RNG alone
    )
    return accelerator.prepare(loader) if accelerator is not None else loader


def _scores(model, ds, batch_size, accelerator, rewards_fn) -> dict[int, float]:
    """``{index: score}`` over every batch of ``ds`` (gathered across processes); a batch's
    scores come from ``rewards_fn(batch) -> [B]``."""
    device = next(model.parameters()).device
    out: dict[int, float] = {}
    for batch in _sorted_loader(ds, batch_size, accelerator):
        batch = {k: v.to(device) for k, v in batch.items()}
        score, index = rewards_fn(batch).float(), batch["index"]
        if accelerator is not None:
            score, index = accelerator.gather_for_metrics((score, index))
        out.update(zip(index.tolist(), score.tolist(), strict=True))
    return out


@torch.no_grad()
def predict_margins(
    model,
    ds,
    batch_size: int = 32,
    accelerator=None,
    run: PairRun | None = None,
    first_user_only: bool = False,
    distinct: bool = True,
) -> list[float]:
    """``r+ − r−`` for every pair of a ``PairDataset``, in dataset order (gathered across
    processes when ``accelerator`` is given). ``run``: the ``PairRun`` that holds ``ds`` (its
    prefix cache). ``first_user_only`` routes every row to user 0, as the shared warm-up
    trains. ``distinct`` scores each distinct (user, text) once and maps the rewards back to
    pairs (a text is one row for all users when the reward ignores the user); ``False`` runs
    both sides of every pair, as training batches do."""
    run = run or PairRun(model, None, None, ds.encoder.max_length, None)
    model.eval()
    if not distinct:

        def pair_margins(batch):
            if first_user_only:
                batch["user_ids"] = torch.zeros_like(batch["user_ids"])
            chosen, rejected = run.rewards(model, ds, batch).chunk(2)
            return chosen - rejected

        margins = _scores(model, ds, batch_size, accelerator, pair_margins)
        return [margins[i] for i in range(len(ds))]
    config = (accelerator.unwrap_model(model) if accelerator else model).adapter_config
    share = first_user_only or not config.personalized
    rows = run.distinct_rows(ds, share)
    rewards = _scores(model, rows, batch_size, accelerator, lambda b: run.row_rewards(model, b))
    return [rewards[c] - rewards[r] for c, r in zip(rows.chosen, rows.rejected, strict=True)]


def evaluate(
    model,
    data,
    batch_size: int = 32,
    split: str = "test",
    seed: int = 0,
    prefix_cache=None,
    unknown_user: str = "error",
    shard=None,
) -> dict:
    """``metrics.json`` for ``model`` on comparisons ``data``.

    A personalized model must know every user of ``data`` unless ``unknown_user`` is
    ``"population"``: then a user it does not know (one a split dropped, a new one) is scored
    with the population model, and ``unknown_users`` in the metrics counts the rows and users
    that affected. The ``shared`` model scores anyone (its reward ignores the user).
    ``prefix_cache`` (from training on the same backbone) skips the frozen blocks when the
    model's adapters sit in its top blocks only. With ``shard`` (a user-sharded run's), the
    model holds this process's users: it scores their rows and the metrics are every
    process's.
    """
    from dataclasses import replace

    from .population import POPULATION, add_population_user

    if unknown_user not in ("error", "population"):
        raise ValueError(f"unknown_user must be 'error' or 'population', got {unknown_user!r}")
    # Unknown to every process, not just this one: each process decides alike, on all rows.
    unknown = sorted({c.user for c in data} - set(model.users if shard is None else shard.users))
    everyone = data
    personalized = model.adapter_config.personalized
    if personalized and unknown and unknown_user == "error":
        raise UnknownUserError(
            f"{len(unknown)} user(s) in the data are not in the model: {', '.join(unknown[:5])}; "
            "--unknown-user population scores them with the population model"
        )
    if shard is not None:
        if personalized and unknown and model.population is None:
            # The fallback population is the mean over every process's users, not this one's.
            model.population = shard.mean_of(model)
        data = shard.to_score(data)
    rows = data
    if not personalized:
        rows = [replace(c, user=model.users.names[0]) for c in data]
    elif unknown:
        add_population_user(model)
        rows = [c if c.user in model.users else replace(c, user=POPULATION) for c in data]
    cache = None
    if prefix_cache is not None and model.adapter_config.top_layers:
        cache = PrefixCache(model, store=prefix_cache)
    run = PairRun(model, None, rows, model.max_length, cache, progress=False)
    margins = predict_margins(model, run.val, batch_size, run=run) if rows else []
    users, method = [c.user for c in data], model.adapter_config.method
    if shard is not None:
        metrics = shard.metrics(users, margins, method, split, seed=seed)
    else:
        metrics = summarize(users, margins, method, split, seed)
    gone = set(unknown)
    metrics["unknown_users"] = {
        "policy": "population" if personalized else "shared",
        "users": len(gone),
        "rows": sum(c.user in gone for c in everyone),
    }
    return metrics

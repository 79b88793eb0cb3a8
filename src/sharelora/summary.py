"""What a training run records about itself: the ``training`` section of ``sharelora.json``
(the run's config, its size, what it chose on validation and what the model serves)."""

from __future__ import annotations

from dataclasses import asdict

__all__ = ["run_summary", "served"]


def run_summary(trainer, strength: float, tried: dict) -> dict:
    """The summary of a finished ``Trainer`` run: ``strength`` as set, ``tried``: the
    validation metrics of each strength tried (``strength.apply_strength``)."""
    cfg, model, acc = trainer.cfg, trainer.model, trainer.acc
    out = {
        "config": asdict(cfg),
        "train_pairs": trainer.train_pairs,
        "val_pairs": trainer.val_pairs,
        "truncated_texts": trainer.pairs.truncated,
        "steps": trainer.progress.global_step,
        "processes": acc.num_processes,
        "seconds": round(trainer.progress.seconds, 1),
        "sparse_users": model.router.sparse_grads,
        "user_state": cfg.user_state,
        "user_tables": cfg.user_tables,
        "deterministic": cfg.deterministic,
        "prefix_cache": "frozen blocks cached, run in eval mode (no dropout there)"
        if trainer.pairs.cache is not None
        else None,
        "best_val_macro_accuracy": trainer.progress.best,
        "prior": cfg.prior if trainer.counts is not None else 0.0,
        "prior_on": cfg.prior_on,
        "strength": strength,
        "served": served(model, strength),
        "population": "trained with every user's pairs"
        if trainer.learner is not None
        else "fixed at the start",
        "best_epochs": trainer.progress.best_at or trainer.progress.epoch,
        # What serving the population serves: the trained one, or the start it beat.
        "fallback": "start"
        if trainer.scale == "start" or "start" in tried
        else "trained population",
        "shrinkage_val": {
            (s if isinstance(s, str) else f"{s:g}"): {
                k: m.get(k) for k in ("macro_accuracy", "loss", "calibrated_loss", "se")
            }
            for s, m in tried.items()
        },
        # The gate's gains and errors (strength.apply_strength): why this model is served.
        "gate": next((m["gate"] for m in tried.values() if "gate" in m), None),
        # Sharded, this process holds some users: the report counts every process's.
        "parameters": model.parameter_report(len(trainer.shard.users) if trainer.shard else None),
        "head": model.head_init,
    }
    if trainer.shard is not None:
        out["shard"] = trainer.shard_record
    return out


def served(model, strength: float) -> str:
    """What a trained model serves: ``"shared"`` (one reward), ``"population"`` (every user
    shrunk all the way, κ = ∞) or ``"personal"``."""
    if not model.adapter_config.personalized:
        return "shared"
    return "population" if strength == 0 else "personal"

"""Choose the training prior's precision τ on validation (``TrainConfig.prior="auto"``).

The prior ``(τ/2) Σ_u |Δ_u|²`` acts during training, so unlike the shrinkage strength (chosen
after one run, ``sharelora.strength``) its scale costs a run per value tried::

    start ─► train at τ = PRIOR_GRID[0] ─► validation loss ─┐
      └────► train at τ = PRIOR_GRID[1] ─► validation loss ─┴─► keep the lowest

Every try starts from the same tensors and the same seed, so a try equals a plain run at that
τ; the criterion is the one ``strength="auto"`` uses, the calibrated validation loss of the
model after its own strength was chosen. Each try keeps its model and log in
``OUTPUT/prior-τ/``; the chosen model (``sharelora.json``, ``adapters.safetensors``, ...) and
its ``val_metrics.json`` go to ``OUTPUT`` as a plain run's would.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from .config import PRIOR_GRID, TrainConfig
from .files import clear_run_state
from .shard import is_main_process, save
from .strength import snapshot
from .train import Trainer


def search_prior(model, train_data, val_data, cfg: TrainConfig, output_dir, cache, shard=None):
    """Train ``model`` once per τ in ``PRIOR_GRID`` and leave it at the try with the lowest
    calibrated validation loss; returns the run's dict (``Trainer.finish``), whose summary
    gains ``prior_search`` (τ: that loss)."""
    start, population = snapshot(model), model.population
    out = Path(output_dir) if output_dir is not None else None
    if out is not None and out.is_dir() and is_main_process():
        clear_run_state(out)  # a plain run's log and checkpoints from before are not this run's
    losses, best = {}, None
    for tau in PRIOR_GRID:
        model.set_trainable(start)
        model.population = population
        where = out / f"prior-{tau:g}" if out is not None else None
        run = Trainer(
            model, train_data, val_data, replace(cfg, prior=tau), where, False, cache, None, shard
        ).run()
        cache = run["prefix_cache"]
        losses[tau] = run["val_metrics"]["calibrated_loss"]
        if best is None or losses[tau] < losses[best[0]]:
            best = tau, snapshot(model), model.population, run
        if where is not None and is_main_process():
            # Optimizer state of every user row: a try is never resumed, so it is dead weight.
            shutil.rmtree(where / "checkpoints", ignore_errors=True)
    _, tensors, model.population, run = best
    model.set_trainable(tensors)
    summary = {**run["summary"], "prior_search": {f"{t:g}": loss for t, loss in losses.items()}}
    summary["config"] = {**summary["config"], "prior": "auto"}
    if out is not None:
        save(model, out, summary, shard, run["val_metrics"])
    return {"summary": summary, "val_metrics": run["val_metrics"], "prefix_cache": cache}

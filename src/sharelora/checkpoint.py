"""Training checkpoints in safetensors + JSON (no pickles), written atomically.

A checkpoint directory holds the model (``save_pretrained``), ``optimizer.safetensors`` (every
tensor of the optimizer state and the RNG states) and ``trainer_state.json`` (the rest: param
groups, scheduler, position in the data, Python RNG, best metric).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .files import save_safetensors, write_text

STATE_FILE = "trainer_state.json"
TENSORS_FILE = "optimizer.safetensors"


@dataclass
class Progress:
    """Where a run is; saved in every checkpoint so that ``--resume`` continues exactly."""

    epoch: int = 0  # epochs finished
    step: int = 0  # batches done in the current epoch
    global_step: int = 0  # optimizer steps
    best: float | None = None  # best validation macro accuracy of the current stage
    best_at: int = 0  # epochs trained at the best (begun ones count whole): what a refit trains
    seconds: float = 0.0


def _split_optimizer_state(state: dict) -> tuple[dict, dict]:
    tensors, plain = {}, {}
    for pid, slots in state["state"].items():
        plain[str(pid)] = {}
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value.detach().contiguous().cpu()
            else:
                plain[str(pid)][name] = value
    return tensors, {"state": plain, "param_groups": state["param_groups"]}


def _join_optimizer_state(tensors: dict, meta: dict) -> dict:
    state = {int(pid): dict(slots) for pid, slots in meta["state"].items()}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def atomic_dir(final: Path):
    """A temporary sibling directory to fill; ``commit(tmp)`` swaps it in by rename."""
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, final: Path) -> None:
    """Swap ``tmp`` in as ``final``. Killed at any point, ``resolve_checkpoint`` still finds a
    complete checkpoint: ``final``, or ``final.old`` while the swap is half done."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():  # a leftover; final is the good one
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def resolve_checkpoint(final: Path) -> Path | None:
    """The complete checkpoint at ``final`` (or its ``.old`` twin mid-swap), if any."""
    old = final.with_name(final.name + ".old")
    return final if final.exists() else old if old.exists() else None


def save_checkpoint(directory: Path, model, optimizer, scheduler, progress: dict) -> None:
    """Write model + optimizer + scheduler + RNG + ``progress`` (epoch, step, ...)."""
    tmp = atomic_dir(directory)
    model.save_pretrained(tmp / "model", training=progress)
    tensors, meta = _split_optimizer_state(optimizer.state_dict())
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    save_safetensors(tensors, tmp / TENSORS_FILE)
    py_state = random.getstate()
    state = {
        "optimizer": meta,
        "scheduler": scheduler.state_dict(),
        "progress": progress,
        "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
    }
    write_text(tmp / STATE_FILE, json.dumps(state))
    commit(tmp, directory)


def load_checkpoint(directory: Path, model, optimizer, scheduler) -> dict:
    """Restore what ``save_checkpoint`` wrote into live objects; returns ``progress``."""
    model.load_trainable(directory / "model" / "adapters.safetensors")
    model.load_population(directory / "model")
    tensors = load_file(directory / TENSORS_FILE)
    state = json.loads((directory / STATE_FILE).read_text())
    optimizer.load_state_dict(_join_optimizer_state(tensors, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return state["progress"]

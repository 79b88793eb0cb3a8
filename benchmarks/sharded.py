"""User-sharded training (``--shard-users auto``) on two CPU processes against one process, as
the number of users N grows: bytes all-reduced per step, peak memory per process, step time.

    python benchmarks/sharded.py [--quick] [--json benchmarks/results/sharded.json]

Setting: MiniLM, ``sharelora`` r=8 on query/value of the top block (frozen blocks cached, as
the demo trains), full Adam state, row-sparse user tables (the default from 256 users), the
population learner on, batches of 16 pairs of 32 tokens. The library's own loop runs
(``Trainer.run_epoch``): the same 512 pairs of 512 users at every N, so a step does the same
work, while the other users' rows and their optimizer state are made resident (written in
place, as training every user once would) before the timed epoch.

Cells, each its own launch so that the peak resident memory is its own:
  * ``one process``: every user in one process;
  * ``sharded``: two processes on gloo (``accelerate launch``), each holding its users only;
  * ``dense DDP`` (``--shard-users off``, up to 10^4 users): two processes each holding every
    user, DDP all-reducing every user table's gradient: what sharding replaces.
Bytes per step count what each process sends into all-reduce: DDP's gradient buckets (a
communication hook) and the sharded step's own all-reduce (the learner's rows and the squared
norm). Step time: per step, the fastest of three timed epochs (the least disturbed by other
load), each in turn with an epoch of a twin run of 10^3 users in the same processes, so that
the ratio to 10^3 users is measured side by side; the peak memory is read before the twin
exists. Finished cells are kept in the JSON, so a killed run resumes where it stopped.

Targets (issue 33): sharded at 10^5 users against 10^3: bytes per step within 1.05x, step time
within 1.2x; peak memory per process at 10^5 at most 0.6x of one process's.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from common import machine, parser, table

from sharelora import DEFAULT_BACKBONE, AdapterConfig, PersonalizedRewardModel, TrainConfig
from sharelora.data import Comparison
from sharelora.shard import plan
from sharelora.train import Trainer

SIZES = [1_000, 10_000, 100_000]
DENSE_UP_TO = 10_000  # dense DDP all-reduces every user's gradient: slow beyond
PAIRS, BATCH = 512, 16
ROUNDS = 3  # timed epochs after the first; the fastest is kept
LAUNCH_TWO = [  # as tests/conftest.py: --multi_gpu without GPUs starts CPU processes on gloo
    *("-m", "accelerate.commands.launch", "--multi_gpu"),
    *("--num_processes", "2", "--num_machines", "1"),
    *("--mixed_precision", "no", "--dynamo_backend", "no"),
]
MODES = {"one process": [], "sharded": LAUNCH_TWO, "dense DDP": LAUNCH_TWO}
DEFAULT_JSON = Path(__file__).parent / "results" / "sharded.json"


def comparisons(users: int) -> list[Comparison]:
    """``PAIRS`` pairs, one for each of ``PAIRS`` users spread over the ``users`` ids."""
    rng = random.Random(0)
    words = [
        "apple",
        "river",
        "stone",
        "cloud",
        "lamp",
        "train",
        "book",
        "tree",
        "road",
        "glass",
        "salt",
        "wind",
    ]
    rows = []
    for j in range(PAIRS):
        a, b = rng.sample(words, 2), rng.sample(words, 2)
        user = f"u{j * users // PAIRS}"
        rows.append(Comparison(f"question {j}?", " ".join(a), " ".join(b), user))
    return rows


class Sent:
    """Bytes this process sends into ``dist.all_reduce``, of them ``ddp`` in DDP's gradient
    buckets (DDP's default hook, registered as a Python hook, calls ``dist.all_reduce``)."""

    def __init__(self):
        self.total = self.ddp = 0
        self._all_reduce = dist.all_reduce
        dist.all_reduce = self._count

    def _count(self, tensor, *args, **kwargs):
        self.total += tensor.numel() * tensor.element_size()
        return self._all_reduce(tensor, *args, **kwargs)

    def hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self.ddp += bucket.buffer().numel() * bucket.buffer().element_size()
        return allreduce_hook(state, bucket)


def _touch(trainer: Trainer) -> None:
    """Write every user table and its optimizer state in place: zeroed memory is not resident
    until written, and a run that trains every user writes all of it."""
    state = trainer.optimizer.optimizer.state
    with torch.no_grad():
        for table_ in trainer.model.user_parameters():
            for t in (table_, *state[table_].values()):
                t.mul_(1)


def _trainer(mode: str, users: int) -> Trainer:
    """A trainer of ``users`` users past its first epoch, every user's state resident."""
    names = [f"u{i}" for i in range(users)]
    data = comparisons(users)
    shard = plan(names, data, personalized=True, mode="off" if mode == "dense DDP" else "auto")
    local = names if shard is None else shard.local_users(names)
    model = PersonalizedRewardModel.from_backbone(
        DEFAULT_BACKBONE, local, AdapterConfig(rank=8, top_layers=1)
    )
    cfg = TrainConfig(epochs=1 + ROUNDS, batch_size=BATCH, max_length=32, progress=False)
    trainer = Trainer(model, data, None, cfg, shard=shard)
    trainer.run_epoch(0)  # every step's state exists
    _touch(trainer)
    return trainer


def one(mode: str, users: int) -> dict:
    """One cell in this process (one rank of it under a launcher): the ``users`` run's bytes
    and peak memory, and its step time in turns with a twin of ``SIZES[0]`` users."""
    sent = Sent()  # counts only what is sent while the big run steps
    big = _trainer(mode, users)
    if hasattr(big.wrapped, "register_comm_hook"):  # DDP
        big.wrapped.register_comm_hook(None, sent.hook)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB: before the twin
    twin = _trainer(mode, SIZES[0])
    seconds = {"big": [], "twin": []}
    for epoch in range(1, ROUNDS + 1):
        for name, trainer in (("twin", twin), ("big", big)):
            before, steps = (sent.total, sent.ddp), trainer.progress.global_step
            start = time.perf_counter()
            trainer.run_epoch(epoch)
            steps = trainer.progress.global_step - steps
            seconds[name].append((time.perf_counter() - start) / steps)
            if name == "big":
                total, ddp = (sent.total - before[0]) / steps, (sent.ddp - before[1]) / steps
    fastest = {k: min(v) for k, v in seconds.items()}  # the least disturbed epoch
    return {
        "rank": big.acc.process_index,
        "processes": big.acc.num_processes,
        "threads": torch.get_num_threads(),
        "local_users": big.model.num_users - (big.learner is not None),
        "steps": steps,
        "seconds_per_step": fastest["big"],
        "twin_seconds_per_step": fastest["twin"],
        "ratio_vs_twin": fastest["big"] / fastest["twin"],
        "seconds_per_step_rounds": seconds,
        "bytes_per_step": total,
        "ddp_bytes_per_step": ddp,
        "peak_gib": peak,
        "user_table_gib": sum(t.numel() * t.element_size() for t in big.model.user_parameters())
        / 1024**3,
    }


def run_cell(mode: str, users: int) -> dict:
    cmd = [sys.executable, *MODES[mode], __file__, "--one", mode, str(users)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{mode} at {users:,} users failed:\n{out.stderr[-3000:]}")
    ranks = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    ranks.sort(key=lambda r: r["rank"])
    # A step waits for the slowest process, and memory is bounded by the fullest one.
    keys = ("seconds_per_step", "ratio_vs_twin", "bytes_per_step", "ddp_bytes_per_step", "peak_gib")
    return {"ranks": ranks} | {k: max(r[k] for r in ranks) for k in keys}


def report(store: dict) -> None:
    cells = store["cells"]
    rows = []
    for key, c in cells.items():
        mode, users = key.rsplit("/", 1)
        held = "/".join(f"{r['local_users']:,}" for r in c["ranks"])
        rows.append(
            [mode, f"{int(users):,}", held, c["bytes_per_step"] / 1024,
             c["ddp_bytes_per_step"] / 1024, c["peak_gib"], c["seconds_per_step"] * 1000,
             c["ratio_vs_twin"]]
        )  # fmt: skip
    print(f"{machine()}; MiniLM top block, r=8, {BATCH} pairs x 32 tokens per step")
    headers = ["mode", "users", "users per process", "KiB all-reduced / step / process"]
    headers += ["of them DDP's buckets", "peak RSS GiB / process", "ms / step"]
    headers += [f"step time / its {SIZES[0]:,}-user twin's"]
    print(table(headers, rows))
    small, big = cells.get(f"sharded/{SIZES[0]}"), cells.get(f"sharded/{SIZES[-1]}")
    alone = cells.get(f"one process/{SIZES[-1]}")
    if small and big:
        print(
            f"sharded {SIZES[-1]:,} vs {SIZES[0]:,} users: bytes/step "
            f"{big['bytes_per_step'] / small['bytes_per_step']:.3f}x (target <= 1.05), "
            f"step time {big['ratio_vs_twin']:.2f}x, in turns with a {SIZES[0]:,}-user twin "
            "(target <= 1.2)"
        )
    if big and alone:
        print(
            f"peak memory per process at {SIZES[-1]:,} users, sharded vs one process: "
            f"{big['peak_gib'] / alone['peak_gib']:.2f}x (target <= 0.6)"
        )


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # MODE N: one cell, this process
    p.add_argument("--fresh", action="store_true", help="drop the cells the JSON holds")
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]))), flush=True)
        return
    path = Path(args.json or DEFAULT_JSON)
    keep = path.exists() and not args.fresh
    store = json.loads(path.read_text()) if keep else {"machine": machine(), "cells": {}}
    sizes = SIZES[:2] if args.quick else SIZES
    for users in sizes:
        for mode in MODES:
            key = f"{mode}/{users}"
            if key in store["cells"] or (mode == "dense DDP" and users > DENSE_UP_TO):
                continue
            store["cells"][key] = run_cell(mode, users)
            print(f"{key}: {json.dumps(store['cells'][key]['ranks'])}", file=sys.stderr)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(store, indent=1))
    report(store)


if __name__ == "__main__":
    main()

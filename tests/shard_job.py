"""Train six users with the library's loop, sharded by user under `accelerate launch`.

Usage: python shard_job.py BACKBONE START OUTPUT MODE   (used by test_sharded.py)

MODE ``frozen``: the start's shared parts frozen, a fixed strength, no refit.
MODE ``trained``: the shared parts train, with the population learner, row-sparse user tables,
the best epoch chosen on validation and a refit on every pair (at a fixed strength: the gate
would serve the untrained start on this little data, and the refit would take no step).

Each process prints its user count and the test metrics (every process's rows, and a user no
process owns).
"""

import json
import random
import sys

import torch

from sharelora import AdapterConfig, PersonalizedRewardModel
from sharelora.data import Comparison
from sharelora.evaluate import evaluate
from sharelora.recipe import TrainConfig, train
from sharelora.shard import plan

USERS = [f"user{i}" for i in range(6)]


def tastes(seed: int, base: int) -> list[Comparison]:
    """Even users prefer 'yes' replies, odd ones 'no'; user i has base + i pairs."""
    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "lamp", "train", "book", "tree"]
    rows = []
    for i, user in enumerate(USERS):
        good, bad = ("yes", "no") if i % 2 == 0 else ("no", "yes")
        for j in range(base + i):
            a, b = rng.sample(words, 2)
            rows.append(Comparison(f"question {j}?", f"{good} {a} {b}", f"{bad} {b} {a}", user))
    rng.shuffle(rows)
    return rows


if __name__ == "__main__":
    backbone, start, output, mode = sys.argv[1:5]
    train_rows, val_rows = tastes(0, 6), tastes(1, 2)
    shard = plan(USERS, train_rows, personalized=True)
    users = USERS if shard is None else shard.local_users(USERS)
    model = PersonalizedRewardModel.from_backbone(backbone, users, AdapterConfig(rank=2))
    common = dict(epochs=2, lr=5e-3, batch_size=8, progress=False, max_length=32, init_from=start)
    if mode == "frozen":
        cfg = TrainConfig(**common, freeze_shared=True, strength=1.0, refit=False)
        result = train(model, train_rows, val_rows, cfg, output, shard=shard)
    else:
        cfg = TrainConfig(**common, sparse_users="on", strength=1.0)
        refit = train_rows + val_rows
        result = train(model, train_rows, val_rows, cfg, output, refit_data=refit, shard=shard)
    summary, trained_users = result["summary"], len(model.users)
    # A user no process owns is scored once, by the population of every process's users.
    stranger = [Comparison(f"question {j}?", "yes lamp", "no lamp", "stranger") for j in range(3)]
    test = evaluate(model, tastes(2, 1) + stranger, unknown_user="population", shard=shard)
    test = {k: test[k] for k in ("n", "macro_accuracy", "unknown_users")}
    line = json.dumps({"processes": summary["processes"], "users": trained_users, "test": test})
    sys.stdout.write(line + "\n")  # one write: the two processes' lines never interleave
    sys.stdout.flush()
    if torch.distributed.is_initialized():  # closed before exit, as the CLI does (gloo aborts)
        torch.distributed.destroy_process_group()

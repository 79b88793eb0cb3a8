"""User-sharded training: each user belongs to one process, which alone holds the user's rows
and their optimizer state::

    rank 0: users {a, c, ...}  tables [N/2, ...]  ─┐  shared parts (B, head): DDP all-reduce
    rank 1: users {b, d, ...}  tables [N/2, ...]  ─┘  user tables: never communicated

Every process walks the same global batches (the single-process order over every pair) and
keeps the pairs of its own users; the loss is scaled so that DDP's average of the shared
gradients is the single-process mean. The only other traffic per step is the population
learner's rows (every user's pairs train it) and one number for the gradient norm, so a step
communicates the same bytes at 10^3 users as at 10^5. The single-process machinery (row-sparse
gradients, lazy row-wise Adam, host tables) runs unchanged in each process.

``torch.distributed`` (set up by ``accelerate``) does the communication; nothing here opens a
channel of its own.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import STATE_FILE, resolve_checkpoint, save_checkpoint
from .data import Comparison
from .evaluate import summarize
from .files import write_json
from .population import user_tables
from .users import UserVocab

__all__ = ["Shard", "checkpoints", "is_main_process", "on_cpu", "plan", "save"]


def on_cpu() -> bool:
    """No accelerator: processes a launcher starts form one gloo group only when the state is
    set up with ``cpu=True`` (else each trains alone), so every first use of it passes this."""
    return not torch.cuda.is_available() and not torch.backends.mps.is_available()


def _state():
    from accelerate import PartialState

    return PartialState(cpu=on_cpu())


def is_main_process() -> bool:
    """Whether this is the process that writes shared files (the only one, or rank 0)."""
    return _state().is_main_process


def plan(users: list[str], data: list[Comparison], personalized: bool, mode: str = "auto"):
    """The shard of this process, or ``None`` when nothing is sharded (one process, a shared
    reward, or ``mode="off"``). Users are dealt by comparison count, largest first, each to
    the least loaded process (of equal loads, the one with fewer users), so every process
    steps over about as many pairs and holds about as many rows. ``users``: the
    order a single process holds them in (the merged model's)."""
    state = _state()
    if mode == "off" or state.num_processes == 1 or not personalized:
        return None
    world = state.num_processes
    if len(users) < world:
        raise ValueError(
            f"--shard-users gives each process its own users, but {len(users)} users cannot "
            f"fill {world} processes: launch at most {len(users)}, or pass --shard-users off"
        )
    counts = Counter(c.user for c in data)
    loads, held, owner = [0] * world, [0] * world, {}
    for user in sorted(users, key=lambda u: -counts[u]):  # stable: ties keep the users' order
        # Ties of pairs go to the process with fewer users (users without training pairs
        # still hold rows and state), then to the lowest rank.
        rank = min(range(world), key=lambda r: (loads[r], held[r]))
        owner[user] = rank
        loads[rank] += counts[user]
        held[rank] += 1
    return Shard(state.process_index, world, owner, list(users))


@dataclass
class Shard:
    """Which process owns which user; ``users``: every user, in the merged model's order."""

    rank: int
    world: int
    owner: dict[str, int]
    users: list[str]

    def local_users(self, users: list[str]) -> list[str]:
        return [u for u in users if self.owner.get(u) == self.rank]

    def positions(self, data: list[Comparison]) -> list[int]:
        """Where this process's pairs sit in ``data``. A pair of a user no process owns (the
        population learner's copy) goes with the pair it copies: the caller places it."""
        return [i for i, c in enumerate(data) if self.owner.get(c.user) == self.rank]

    def mine(self, data: list[Comparison] | None) -> list[Comparison] | None:
        return None if data is None else [data[i] for i in self.positions(data)]

    def to_score(self, data: list[Comparison]) -> list[Comparison]:
        """The rows this process scores: its users' and, dealt by position, those of users no
        process owns (each process holds the population that scores them)."""
        return [
            c for i, c in enumerate(data) if self.owner.get(c.user, i % self.world) == self.rank
        ]

    def record(self, data: list[Comparison]) -> dict:
        """What the run saves about the sharding (``training.shard`` in ``sharelora.json``)."""
        pairs = Counter(self.owner[c.user] for c in data if c.user in self.owner)
        users = Counter(self.owner.values())
        return {
            "processes": self.world,
            "users_per_process": [users[r] for r in range(self.world)],
            "pairs_per_process": [pairs[r] for r in range(self.world)],
            "rule": "by comparison count, largest first, to the least loaded process (ties: "
            "the one with fewer users)",
        }

    def gather(self, obj) -> list:
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    # ------------------------------------------------------------------------- batches
    def global_lengths(self, positions: list[int], lengths: list[int], total: int) -> list[int]:
        """Every pair's length in global order, from each process's own (once per run)."""
        out = [0] * total
        for pos, lens in self.gather((positions, lengths)):
            for p, n in zip(pos, lens, strict=True):
                out[p] = n
        return out

    @staticmethod
    def local_batches(order: list[int], positions: list[int], batch_size: int):
        """Per global batch of ``order``: ``(local indices, global batch size)``. A process
        with none of a batch's pairs still steps, on its first pair at weight zero, so every
        process takes every step and DDP's all-reduce never waits on a missing rank."""
        local = {p: j for j, p in enumerate(positions)}
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            yield [local[p] for p in chunk if p in local] or None, len(chunk)

    def loss_factor(self, local: int | None, size: int) -> float:
        """What a process's mean loss over its ``local`` pairs is multiplied by: DDP averages
        the shared gradients over processes, so ``world · local / size`` makes that average
        the mean over the global batch of ``size`` pairs (zero for a stand-in step)."""
        return self.world * local / size if local else 0.0

    # --------------------------------------------------------------------------- grads
    def ignore_user_tables(self, model) -> None:
        """Keep the user tables out of DDP (call before wrapping): their rows differ per
        process by design, and DDP would all-reduce every row every step."""
        tables = {id(p) for p in model.user_parameters()}
        names = [n for n, p in model.named_parameters() if id(p) in tables]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)

    @torch.no_grad()
    def reduce_grads(self, model, learner: int | None, max_norm: float) -> float:
        """After backward: user-table gradients to the single-process scale (DDP averaged the
        shared ones over processes; the tables it ignores hold ``world`` times theirs), the
        learner's rows summed over processes, and every gradient clipped by the global norm
        (``max_norm`` 0: none). Returns that norm. One all-reduce of the learner's rows and
        one number: the same bytes at any number of users."""
        tables = [t for t in model.user_parameters() if t.grad is not None]
        # Everything stays on the communication device until the one number read at the end:
        # on a GPU, a host copy per table would wait for the device each time.
        device = _comm_device()
        rows, rest_sq = [], torch.zeros(1, device=device)
        for table in tables:
            table.grad.div_(self.world)
            row, sq = _split_row(table.grad, learner)
            rows.append(row.flatten().float().to(device))
            rest_sq += sq.to(device)
        flat = torch.cat([*rows, rest_sq])
        dist.all_reduce(flat)
        offset, learner_sq = 0, torch.zeros((), device=device)
        for table, row in zip(tables, rows, strict=True):
            summed = flat[offset : offset + row.numel()]
            offset += row.numel()
            if learner is not None:
                table.grad = _put_row(table.grad, learner, summed.view(table.shape[1:]))
                learner_sq += summed.pow(2).sum()
        shared = [p.grad for p in model.shared_parameters() if p.grad is not None]
        shared_sq = sum((g.float().pow(2).sum().to(device) for g in shared), learner_sq)
        norm = float((shared_sq + flat[-1]).sqrt())  # equal on every rank
        if max_norm and norm > max_norm:
            scale = max_norm / (norm + 1e-6)  # as torch.nn.utils.clip_grad_norm_
            for g in shared + [t.grad for t in tables]:
                g.mul_(scale)
        return norm

    # ----------------------------------------------------------------- population/counts
    @torch.no_grad()
    def mean_of(self, model) -> dict[str, torch.Tensor]:
        """``population.mean_of`` over every process's users."""
        from .population import mean_of

        mean = mean_of(model)
        for name, table in user_tables(model).items():
            total = torch.cat([table.sum(0).flatten().float(), torch.tensor([len(table)])])
            total = total.to(_comm_device())
            dist.all_reduce(total)
            total = total.cpu()
            mean[name] = (total[:-1] / total[-1]).view_as(mean[name]).to(mean[name])
        return mean

    def median_count(self, counts: torch.Tensor) -> float:
        """The median training count over every process's users with pairs (the strength's
        ``median n_u``)."""
        everyone = torch.tensor([n for part in self.gather(counts.tolist()) for n in part])
        trained = everyone[everyone > 0].float()
        return float(trained.median()) if len(trained) else 1.0

    # ---------------------------------------------------------------------- checkpoints
    def save_checkpoints(self, root: Path, state: tuple, better: bool) -> None:
        """Every process's checkpoint of one step, in two phases: each writes ``NAME.next``
        and, once every process has (a barrier), swaps it in, keeping ``NAME.previous``.
        Killed anywhere, the processes still share a step they all hold (``settle``)."""
        names = (["best"] if better else []) + ["last"]
        for name in names:
            save_checkpoint(root / f"{name}.next", *state)
        dist.barrier()
        for name in names:
            final, previous = root / name, root / f"{name}.previous"
            shutil.rmtree(previous, ignore_errors=True)
            if final.exists():
                final.rename(previous)
            (root / f"{name}.next").rename(final)

    def settle(self, root: Path) -> None:
        """Before a resume: put in ``root/last`` the newest step every process holds (one
        killed mid-save may be a step behind the others), and in ``root/best`` the best as
        of that step."""
        last = _candidates(root, "last")
        held = [set(map(tuple, steps)) for steps in self.gather(sorted(last))]
        common = set.intersection(*held)
        if not common:
            if any(held):
                raise ValueError(
                    f"{root}: the processes' checkpoints share no step; start without --resume"
                )
            return
        at = max(common)
        _put(last[at], root / "last", root, "last")
        best = {k: p for k, p in _candidates(root, "best").items() if k <= at}
        if best:
            _put(best[max(best)], root / "best", root, "best")

    # ---------------------------------------------------------------------------- save
    def save_merged(self, model, directory: str | Path, training: dict) -> None:
        """One model of every user, as a single process saves it: each process sends its
        rows to process 0, which writes ``directory``."""
        names = list(user_tables(model))
        mine = {n: t.cpu() for n, t in model.trainable_state_dict().items() if n in names}
        parts = [None] * self.world if self.rank == 0 else None
        dist.gather_object((model.users.names, mine), parts, dst=0)
        if self.rank == 0:
            # Every process's rows one after another, then put in the merged model's order.
            stacked = [u for users, _ in parts for u in users]
            at = {u: i for i, u in enumerate(stacked)}
            order = self.users + [u for u in model.users.names if u not in self.owner]
            index = torch.tensor([at[u] for u in order])
            merged = {n: torch.cat([rows[n] for _, rows in parts])[index] for n in names}
            model.save_pretrained(directory, training, users=UserVocab(order), tables=merged)
        dist.barrier()  # no process reads the model before it is written

    def metrics(self, users, margins, method: str, split: str, texts=None, **kw):
        """``summarize`` over every process's pairs, with their ``texts`` (this process's, in
        its pairs' order) when given."""
        gathered = self.gather((users, margins, texts))
        every_user = [u for part, _, _ in gathered for u in part]
        every_margin = [m for _, part, _ in gathered for m in part]
        every_text = None if texts is None else [t for _, _, part in gathered for t in part]
        return summarize(every_user, every_margin, method, split, texts=every_text, **kw)


def checkpoints(out: Path, shard: Shard | None) -> Path:
    """``OUTPUT/checkpoints``, or when sharded each process's own directory under it (a
    resume must then use as many processes)."""
    root = Path(out) / "checkpoints"
    ours = f"-of-{shard.world}" if shard is not None else None
    others = sorted(p.name for p in root.glob("rank-*-of-*") if not ours or ours not in p.name)
    if others:
        raise ValueError(
            f"{root} holds the checkpoints of a run sharded over another number of processes "
            f"({others[0]}): --resume with as many processes, or start without --resume"
        )
    return root if shard is None else root / f"rank-{shard.rank}{ours}"


def save(model, directory, training: dict, shard: Shard | None, val_metrics=None) -> None:
    """Write the trained model (merged from every shard, else from the main process) and,
    when given, its ``val_metrics.json``."""
    if shard is not None:
        shard.save_merged(model, directory, training)
    elif is_main_process():
        model.save_pretrained(directory, training=training)
    if val_metrics and is_main_process():  # the per-pair losses stay in memory
        kept = {k: v for k, v in val_metrics.items() if k != "pairs"}
        write_json(Path(directory) / "val_metrics.json", kept)


def _candidates(root: Path, name: str) -> dict[tuple, Path]:
    """``{(epoch, step, global step): directory}`` of the complete checkpoints ``name``,
    ``name.next`` and ``name.previous`` under ``root``."""
    out = {}
    for suffix in ("", ".next", ".previous"):
        path = resolve_checkpoint(root / f"{name}{suffix}")
        if path is not None:
            p = json.loads((path / STATE_FILE).read_text())["progress"]
            out[(p["epoch"], p["step"], p["global_step"])] = path
    return out


def _put(chosen: Path, final: Path, root: Path, name: str) -> None:
    """``chosen`` as ``final``; every other copy of checkpoint ``name`` removed."""
    keep = root / f"{name}.chosen"
    if chosen != keep:
        shutil.rmtree(keep, ignore_errors=True)
        chosen.rename(keep)
    for other in root.glob(f"{name}*"):
        if other != keep:
            shutil.rmtree(other)
    keep.rename(final)


def _comm_device() -> torch.device:
    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")


def _split_row(grad: torch.Tensor, row: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad[row], |grad without that row|² [1])`` of a dense or a row-sparse gradient, on
    the gradient's device."""
    shape = grad.shape[1:]
    if grad.is_sparse:
        g = grad.coalesce()
        idx, values = g.indices()[0], g.values()
        hit = idx == row if row is not None else torch.zeros_like(idx, dtype=torch.bool)
        picked = values[hit].sum(0) if hit.any() else values.new_zeros(shape)
        return picked, values[~hit].float().pow(2).sum().view(1)
    if row is None:
        return grad.new_zeros(shape), grad.float().pow(2).sum().view(1)
    total = grad.float().pow(2).sum() - grad[row].float().pow(2).sum()
    return grad[row].clone(), total.view(1)


def _put_row(grad: torch.Tensor, row: int, value: torch.Tensor) -> torch.Tensor:
    value = value.to(grad.dtype)
    if not grad.is_sparse:
        grad[row] = value.to(grad.device)
        return grad
    g = grad.coalesce()
    keep = g.indices()[0] != row
    idx = torch.cat([g.indices()[:, keep], torch.tensor([[row]], device=g.device)], dim=1)
    values = torch.cat([g.values()[keep], value.to(g.device).unsqueeze(0)])
    # The rows are the gradient's own, and ``row`` is a row of the table.
    return torch.sparse_coo_tensor(idx, values, grad.shape, check_invariants=False).coalesce()

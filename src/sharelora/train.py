"""The training loop: one ``accelerate`` loop for CPU, one GPU, or many (``accelerate launch``).

``sharelora.recipe`` runs it (choose on validation, then refit); this module is one run.

A run is a ``Trainer`` with explicit state, read top to bottom::

    setup (__init__)  ─►  for each epoch: run_epoch ─► evaluate ─► checkpoint  ─►  finish

``run_epoch`` holds the step (forward, loss, backward, clip, optimizer step, log); the stages
of the reference recipe (a shared warm-up, then personal training from the population model)
are decided in ``_begin_epoch`` alone; ``finish`` loads the best checkpoint, sets the
personalization strength and writes the model.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from . import population
from .batches import epoch_batches
from .checkpoint import Progress, load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import Comparison, pair_texts
from .evaluate import predict_margins, summarize
from .files import clear_run_state
from .optim import build_optimizer, build_scheduler, clip_grad_norm_
from .pairs import PairRun, bt_loss, pair_correct
from .prefix import PrefixCache
from .shard import checkpoints, on_cpu, save
from .strength import apply_scale, apply_strength
from .summary import run_summary

__all__ = ["Trainer", "TrainingError"]


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, missing checkpoint to resume, ...)."""


def _setup_accelerator(cfg: TrainConfig) -> Accelerator:
    return Accelerator(
        cpu=on_cpu(),
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision="bf16" if torch.cuda.is_available() else "no",
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )


class Trainer:
    """One training run of ``model`` (in place) with the Bradley-Terry loss.

    Args:
        model: a ``PersonalizedRewardModel``; every training user must be in its vocabulary.
        train_data, val_data: comparisons; validation selects the best epoch and the strength.
        cfg: the ``TrainConfig``.
        output_dir: where checkpoints, the log and the final model go (``None``: nowhere).
        resume: continue from ``output_dir/checkpoints/last``; without it a fresh run first
            removes the previous run's state (``files.RUN_STATE``) from ``output_dir``.
        prefix_cache: a ``PrefixCache`` over the same backbone to reuse.
        shard: a ``sharelora.shard.Shard``: ``model`` holds this process's users, and of
            ``train_data``/``val_data`` (every user's) it trains and validates on theirs.
    """

    def __init__(
        self,
        model,
        train_data: list[Comparison],
        val_data: list[Comparison] | None,
        cfg: TrainConfig,
        output_dir: str | Path | None = None,
        resume: bool = False,
        prefix_cache: PrefixCache | None = None,
        scale: float | None = None,
        shard=None,
    ):
        self.shard, self.total = shard, len(train_data)  # pairs of every process
        self.train_pairs = len(train_data)  # the users' own (the learner's copies come next)
        self.val_pairs = len(val_data or [])
        self.positions = None  # sharded: where this process's pairs sit among every pair
        self.lengths = None  # sharded and grouped by length: every pair's length, in order
        if shard is not None:
            self.shard_record = shard.record(train_data)
            self.positions = shard.positions(train_data)
            train_data, val_data = shard.mine(train_data), shard.mine(val_data)
        # Each validation pair's texts, in the order it is scored: the gate's error clusters
        # pairs that share a text as well as a user (strength.paired_se).
        self.val_texts = [pair_texts(c) for c in val_data or []]
        unknown = sorted({c.user for c in train_data} - set(model.users))
        if unknown:
            raise ValueError(f"training users not in the model: {', '.join(unknown[:5])}")
        self.model, self.cfg, self.scale = model, cfg, scale
        self.out = Path(output_dir) if output_dir is not None else None
        set_seed(cfg.seed)  # the training stream: data order, dropout
        model.max_length = cfg.max_length
        self.acc = _setup_accelerator(cfg)
        self._clear_previous_run(resume)
        # A trained shared start is one more fallback at the end (strength.apply_strength).
        self.start = self._setup_start()
        self.learner = self._setup_learner()  # the population's id while it trains as a user
        if self.learner is not None:  # the population trains on every user's pairs
            train_data = train_data + [replace(c, user=population.LEARNER) for c in train_data]
            if shard is not None:  # a copy sits where a single process puts it: after all
                self.positions += [self.total + p for p in self.positions]
            self.total *= 2
        self.pairs = self._setup_data(train_data, val_data, prefix_cache)
        # Training pairs per user [N]: the prior's weight per user and the strength's n_u.
        self.user_counts = torch.bincount(
            torch.as_tensor(self.pairs.train.user_ids), minlength=model.num_users
        )
        self.counts = self._setup_prior()  # on the device, when the prior is on
        optimizer, scheduler = self._setup_optimizer()
        if shard is not None and not model.shared_parameters():
            # Nothing for DDP to synchronise (the shared parts frozen): no wrapper at all.
            self.optimizer, self.scheduler = self.acc.prepare(optimizer, scheduler)
            self.wrapped = model.to(self.acc.device)
        else:
            if shard is not None:
                shard.ignore_user_tables(model)
            prepared = self.acc.prepare(model, optimizer, scheduler)
            self.wrapped, self.optimizer, self.scheduler = prepared
        self.progress = Progress()
        if resume:
            self._restore()
        self.best_val: dict | None = None  # validation metrics of the best checkpoint, if known
        write_log = self.out is not None and self.acc.is_main_process
        self.log = (self.out / "train_log.jsonl").open("a") if write_log else None
        self.started = time.time() - self.progress.seconds

    # ------------------------------------------------------------------------------- setup
    def _setup_start(self) -> dict | None:
        """The start model (``init_from``) in every user's rows, its shared parts frozen on
        request; returns its rows (a fallback of the strength), else ``None``."""
        cfg, model = self.cfg, self.model
        if cfg.freeze_shared and not cfg.init_from:
            raise ValueError(
                "freeze_shared keeps the shared tensors of the model it starts from: start from "
                "one (--init-from DIR, or train's default --from-shared)"
            )
        if not cfg.init_from:
            return None
        from .model import PersonalizedRewardModel

        shared = PersonalizedRewardModel.from_pretrained(cfg.init_from)
        model.population = population.from_shared(model, shared, cfg.init_factoring)
        population.assign(model, model.population)
        if cfg.freeze_shared:
            for p in model.shared_parameters():
                p.requires_grad_(False)
        return population.of(model)

    def _setup_learner(self) -> int | None:
        """The population as one more user that trains (``train_population``)."""
        if not (self.cfg.train_population and self.model.adapter_config.personalized):
            if self.shard is not None and self.cfg.warmup_epochs:
                raise ValueError(
                    "a user-sharded warm-up trains the population learner: keep "
                    "train_population on, or pass --shard-users off"
                )
            return None
        return population.add_learner(self.model, self.cfg.user_lr_scale)

    def _setup_data(self, train_data, val_data, prefix_cache) -> PairRun:
        """The tokenized pairs (through the prefix cache with ``top_layers``), with the model
        in the memory layout it trains in."""
        cfg, model = self.cfg, self.model
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if cfg.user_tables == "host":
            if self.acc.num_processes > 1 and self.shard is None:
                raise ValueError("--user-tables host needs one process or --shard-users auto")
            model.keep_user_tables_on_host()
        cache = None
        if model.adapter_config.top_layers and cfg.cache_prefix:
            model.to(self.acc.device)
            cache = PrefixCache(model, store=prefix_cache)
        run = PairRun(model, train_data, val_data, cfg.max_length, cache, cfg.progress)
        if self.shard is not None and cfg.group_by_length:  # the global order needs them all
            lengths = run.train.lengths()
            self.lengths = self.shard.global_lengths(self.positions, lengths, self.total)
        return run

    def _population(self) -> dict:
        """``population.of`` the model, over every process's users when sharded."""
        if self.shard is None or self.model.population is not None:
            return population.of(self.model)
        return self.shard.mean_of(self.model)

    def _checkpoints(self) -> Path:
        return checkpoints(self.out, self.shard)

    def _setup_prior(self) -> torch.Tensor | None:
        """Each user's pair count on the device when the prior is on, its center fixed at the
        start when nothing moves it (no learner, no warm-up); else ``None``."""
        cfg, model = self.cfg, self.model
        if not (cfg.prior and model.adapter_config.personalized):
            return None
        fixed = self.learner is None and not cfg.warmup_epochs
        if model.population is None and fixed:  # the prior's center: the start
            model.population = self._population()
        return self.user_counts.to(self.acc.device)

    def _setup_optimizer(self):
        """AdamW over shared parts and user tables (row-sparse in one process), and its
        schedule over every step of the run."""
        cfg = self.cfg
        batches = math.ceil(self.total / cfg.batch_size)
        total_steps = cfg.epochs * math.ceil(batches / cfg.grad_accum)
        sparse = cfg.sparse_users
        if self.acc.num_processes > 1 and self.shard is None:
            # DDP all-reduces dense gradients; row-sparse tables are a one-process-per-user path.
            if sparse == "on":
                raise ValueError("--sparse-users on needs one process or --shard-users auto")
            sparse = "off"
        optimizer = build_optimizer(
            self.model,
            cfg.lr,
            cfg.weight_decay,
            sparse_users=sparse,
            user_state=cfg.user_state,
            user_lr_scale=cfg.user_lr_scale,
        )
        return optimizer, build_scheduler(optimizer, total_steps, cfg.warmup_ratio, cfg.schedule)

    def _clear_previous_run(self, resume: bool) -> None:
        if self.out is None:
            return
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            if not resume:
                clear_run_state(self.out)
        self.acc.wait_for_everyone()

    def _restore(self) -> None:
        if self.out is not None and self.shard is not None:
            self.shard.settle(self._checkpoints())
        last = resolve_checkpoint(self._checkpoints() / "last") if self.out else None
        if last is None:
            where = self.out / "checkpoints" if self.out else "(no output directory)"
            raise TrainingError(f"--resume: no checkpoint in {where}; start without --resume")
        state = load_checkpoint(last, self.model, self.optimizer, self.scheduler)
        self.progress = Progress(**state)

    # ------------------------------------------------------------------------------ stages
    def in_warmup(self, epoch: int) -> bool:
        """The shared warm-up routes every row to one row (the population learner's, else
        user 0's), in training and in validation."""
        return epoch < self.cfg.warmup_epochs

    def _begin_epoch(self, epoch: int) -> None:
        """At the end of the warm-up, the row it trained becomes the population: every user
        starts there with fresh Adam state, and best-checkpoint selection starts over (a
        warm-up checkpoint is not a personal model; the population stays reachable through the
        strength). With the learner, users' deviations are still zero: nothing to copy."""
        boundary = self.cfg.warmup_epochs and epoch == self.cfg.warmup_epochs
        if not boundary or self.progress.step != 0:
            return
        model = self.model
        if self.learner is None:
            model.population = population.from_row(model, 0)
            population.assign(model, model.population)
        for table in model.user_parameters():
            self.optimizer.optimizer.state.pop(table, None)
        self.progress.best, self.best_val = None, None

    # ------------------------------------------------------------------------------- epoch
    def run_epoch(self, epoch: int) -> None:
        cfg, acc, model, pairs = self.cfg, self.acc, self.model, self.pairs
        warmup = self.in_warmup(epoch)
        for batch, factor in self._batches(epoch):
            if warmup:
                batch["user_ids"] = torch.full_like(batch["user_ids"], self.learner or 0)
            with acc.accumulate(self.wrapped):
                shares = warmup or not model.adapter_config.personalized
                rewards = pairs.rewards(self.wrapped, pairs.train, batch, shares)  # [2B]
                loss = bt_loss(rewards).mean()
                if self.counts is not None and not warmup:
                    pair_users = batch["user_ids"][: len(rewards) // 2]  # [B]: rows are [+; -]
                    center = None
                    if self.learner is not None:
                        center = population.learner_rows(model, self.learner)
                    loss = loss + cfg.prior * population.deviation_penalty(
                        model, pair_users, self.counts, cfg.prior_on, center
                    )
                self._check_finite(loss, epoch)
                acc.backward(loss if factor is None else factor * loss)
                if acc.sync_gradients and self.shard is not None:
                    self.shard.reduce_grads(model, self.learner, cfg.max_grad_norm)
                elif acc.sync_gradients and cfg.max_grad_norm:
                    self._clip(cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad()
            self.progress.step += 1
            self.progress.global_step += int(acc.sync_gradients)
            self._log_step(epoch, loss, rewards)
            if self._eval_due():
                self.checkpoint(self.evaluate(f"step {self.progress.global_step}", epoch))
                self.wrapped.train()
        self.progress.epoch, self.progress.step = epoch + 1, 0
        per_epoch = cfg.select_best and not cfg.eval_every
        self.checkpoint(self.evaluate(f"epoch {epoch + 1}", epoch) if per_epoch else None)

    def _eval_due(self) -> bool:
        every, step = self.cfg.eval_every, self.progress.global_step
        synced = self.acc.sync_gradients
        return bool(every and self.cfg.select_best and synced and step % every == 0)

    def _batches(self, epoch: int):
        """This epoch's ``(batch, loss factor)`` from the current position (mid-epoch after a
        resume), under a progress bar."""
        cfg, acc, step = self.cfg, self.acc, self.progress.step
        sharded = None
        if self.shard is not None:
            sharded = (self.shard, self.positions, self.total, self.lengths)
        batches, total = epoch_batches(self.pairs.train, cfg, acc, epoch, step, sharded)
        self.wrapped.train()
        return tqdm(
            batches,
            total=total,
            initial=step,
            leave=False,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not cfg.progress or not acc.is_local_main_process,
        )

    def _check_finite(self, loss: torch.Tensor, epoch: int) -> None:
        if not torch.isfinite(loss):
            raise TrainingError(
                f"loss is {loss.item()} at epoch {epoch + 1} step {self.progress.step + 1}; "
                "lower --lr; the last good checkpoint is in checkpoints/last"
            )

    def _clip(self, max_norm: float) -> None:
        if self.model.router.sparse_grads:
            clip_grad_norm_(self.model.parameters(), max_norm)
        else:
            self.acc.clip_grad_norm_(self.model.parameters(), max_norm)

    def _log_step(self, epoch: int, loss: torch.Tensor, rewards: torch.Tensor) -> None:
        chosen, rejected = rewards.detach().chunk(2)
        accuracy = pair_correct(chosen - rejected).mean().item()  # a tie counts half
        self._write_log(
            event="step",
            epoch=epoch,
            step=self.progress.step,
            global_step=self.progress.global_step,
            loss=loss.item(),
            accuracy=accuracy,
            lr=self.scheduler.get_last_lr()[0],
        )

    def _write_log(self, **record) -> None:
        if self.log:
            self.log.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ evaluate/checkpoint
    def evaluate(self, tag: str, epoch: int | None = None) -> dict | None:
        """Validation metrics of the model as it is now (``None`` without validation data);
        during the warm-up (``epoch`` in it) routed as the warm-up trains."""
        pairs, method, bs = self.pairs, self.model.adapter_config.method, self.cfg.batch_size
        if not self.val_pairs:
            return None
        warmup = epoch is not None and self.in_warmup(epoch)
        if self.shard is None:
            margins = predict_margins(self.wrapped, pairs.val, bs, self.acc, pairs, warmup)
            users = self.model.users.decode(pairs.val.user_ids)
            metrics = summarize(users, margins, method, "val", bootstrap=0, texts=self.val_texts)
        else:  # each process its own users' pairs, on its own model; the metrics gathered
            margins, users = [], []
            if pairs.val is not None:
                margins = predict_margins(self.model, pairs.val, bs, None, pairs, warmup)
                users = self.model.users.decode(pairs.val.user_ids)
            metrics = self.shard.metrics(users, margins, method, "val", self.val_texts, bootstrap=0)
        self._write_log(
            event="eval",
            at=tag,
            **asdict(self.progress),
            val_macro_accuracy=metrics["macro_accuracy"],
            val_loss=metrics["loss"],
        )
        return metrics

    def checkpoint(self, metrics: dict | None) -> None:
        """``checkpoints/last`` always, ``checkpoints/best`` when ``metrics`` beat the best."""
        progress, acc = self.progress, self.acc
        progress.seconds = time.time() - self.started
        if self.out is None:
            return
        # Every process holds the (gathered) metrics, so all agree on what is best.
        better = metrics and (progress.best is None or metrics["macro_accuracy"] > progress.best)
        if better:
            progress.best, self.best_val = metrics["macro_accuracy"], metrics
            progress.best_at = progress.epoch + (1 if progress.step else 0)  # epochs to refit
        state = (self.model, self.optimizer, self.scheduler, asdict(progress))
        if self.shard is not None:  # each process its own users, at one step
            self.shard.save_checkpoints(self._checkpoints(), state, better)
        elif acc.is_main_process:
            if better:
                save_checkpoint(self._checkpoints() / "best", *state)
            save_checkpoint(self._checkpoints() / "last", *state)
        acc.wait_for_everyone()  # no process reads a checkpoint before it is written

    # ------------------------------------------------------------------------------ finish
    def finish(self) -> dict:
        """Best checkpoint of this run, strength, summary; writes the model and metrics."""
        cfg, model, acc, out = self.cfg, self.model, self.acc, self.out
        metrics = None
        if out is not None and self.progress.best is not None:
            model.load_trainable(self._checkpoints() / "best" / "model" / "adapters.safetensors")
            metrics = self.best_val
        if self.learner is not None:
            population.detach_learner(model, self.learner)
            self.user_counts = self.user_counts[: self.learner]
        metrics = metrics or self.evaluate("final")
        median = None
        if self.shard is not None:  # the strength's median and population: every user's
            median = self.shard.median_count(self.user_counts)
            model.population = self._population()
        if self.scale is not None:  # a refit: validation chose the scale before
            scale = None if self.scale == "start" else self.scale
            strength = apply_scale(model, scale, self.user_counts, self.start, median)
            tried = {}
        else:
            strength, metrics, tried = apply_strength(
                model,
                cfg.strength,
                metrics,
                self.evaluate,
                self.user_counts,
                cfg.strength_rule,
                self.start,
                median,
            )
        summary = run_summary(self, strength, tried)
        if out is not None:
            save(model, out, summary, self.shard, metrics)
        if self.log:
            self.log.close()
        acc.wait_for_everyone()
        return {"summary": summary, "val_metrics": metrics, "prefix_cache": self.pairs.cache}

    def run(self) -> dict:
        for epoch in range(self.progress.epoch, self.cfg.epochs):
            self._begin_epoch(epoch)
            self.run_epoch(epoch)
        return self.finish()

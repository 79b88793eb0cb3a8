"""The training loop: one ``accelerate`` loop for CPU, one GPU, or many (``accelerate launch``)."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers.trainer_pt_utils import LengthGroupedSampler

from .checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from .data import Comparison, PairDataset
from .evaluate import PairRun, bt_loss, predict_margins, summarize
from .files import OutputLock, write_json
from .optim import SCHEDULES, SPARSE_USERS, build_optimizer, build_scheduler, clip_grad_norm_
from .prefix import PrefixCache
from .strength import apply_strength, snapshot


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, missing checkpoint to resume, ...)."""


@dataclass
class TrainConfig:
    """How to train. Defaults suit LoRA on a small backbone on a laptop CPU.

    Attributes:
        epochs: passes over the training pairs (including ``warmup_epochs``).
        lr: peak learning rate (AdamW) for adapters and head.
        weight_decay: on shared factors and the head only; never on per-user tables.
        batch_size: pairs per optimizer step and process group (global across processes).
        grad_accum: batches accumulated per optimizer step.
        max_grad_norm: gradient clipping (0 disables).
        warmup_ratio, schedule: learning-rate warm-up fraction, then linear/cosine/constant.
        warmup_epochs: the reference two-stage recipe: train these epochs as ``shared`` (all
            users routed to one row), then copy that row to every user and personalize.
        eval_every: evaluate on validation every this many optimizer steps (0: each epoch).
        select_best: keep the checkpoint best on validation; ``False`` keeps the last one and
            uses validation only to choose ``strength`` (fewer passes over validation).
        seed: seeds initialisation, data order and dropout.
        max_length: token budget for prompt + response.
        gradient_checkpointing: recompute activations in backward (less memory, slower).
        group_by_length: batch pairs of similar length (less padding), seeded.
        cache_prefix: with ``AdapterConfig.top_layers``, cache the frozen blocks once per text.
        sparse_users: row-sparse gradients and lazy Adam for user tables (``auto``: from
            ``optim.SPARSE_USERS_THRESHOLD`` users, single process only).
        progress: show tqdm bars.
        user_reg: strength of an L2 pull of each batch user's per-user factors toward the mean
            over all users (0: off). It lets users who agree fall back toward the population;
            it costs one pass over the user tables per step.
        init_from: directory of a trained ``shared`` model to start every user from
            (``PersonalizedRewardModel.start_from``); that model is then the population model.
        strength: personalization strength ``γ`` (``sharelora.strength``): ``"auto"`` picks it
            from ``STRENGTHS`` by validation loss (1 without validation data); a number in
            [0, 1] fixes it; 1 leaves the trained model as it is.
    """

    epochs: int = 3
    lr: float = 2e-3
    weight_decay: float = 0.0
    batch_size: int = 16
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    warmup_ratio: float = 0.1
    schedule: str = "linear"
    warmup_epochs: int = 0
    eval_every: int = 0
    select_best: bool = True
    seed: int = 0
    max_length: int = 256
    gradient_checkpointing: bool = False
    group_by_length: bool = False
    cache_prefix: bool = True
    sparse_users: str = "auto"
    user_reg: float = 0.0
    init_from: str | None = None
    strength: float | str = "auto"
    progress: bool = True

    def __post_init__(self):
        positive = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "max_length": self.max_length,
        }
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"lr must be a positive number (e.g. 2e-3), got {self.lr!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.sparse_users not in SPARSE_USERS:
            raise ValueError(
                f"sparse_users must be one of {SPARSE_USERS}, got {self.sparse_users!r}"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must be >= 0 and below epochs "
                f"({self.epochs}) so that the personal stage runs"
            )
        if self.strength != "auto" and not (
            isinstance(self.strength, (int, float))
            and not isinstance(self.strength, bool)
            and 0 <= self.strength <= 1
        ):
            raise ValueError(
                f"strength must be 'auto' or a number in [0, 1] (1: fully personal, 0: the "
                f"population model), got {self.strength!r}"
            )
        if min(self.eval_every, self.weight_decay, self.max_grad_norm, self.user_reg) < 0:
            raise ValueError("eval_every, weight_decay, max_grad_norm and user_reg must be >= 0")


def _order(ds: PairDataset, cfg: TrainConfig, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    if cfg.group_by_length:
        return list(LengthGroupedSampler(cfg.batch_size, lengths=ds.lengths(), generator=g))
    return torch.randperm(len(ds), generator=g).tolist()


def _loader_generator() -> torch.Generator:
    # A DataLoader seeds its iterator from the global RNG unless given its own generator; that
    # draw would shift the dropout stream after a resume. Our order is already fixed.
    return torch.Generator().manual_seed(0)


def user_pull(model, user_ids: torch.Tensor) -> torch.Tensor:
    """Mean over the batch's distinct users of ``|row_u − mean row|²``, summed over every user
    table; the mean is over all users and carries no gradient."""
    users = user_ids.unique()
    total = torch.zeros((), device=user_ids.device)
    for layer in model.adapter_layers.values():
        for table in layer.user_parameters.values():
            rows = layer._rows(table, users)  # [k, ...], row-sparse gradient when enabled
            total = total + (rows - table.detach().mean(0)).pow(2).sum()
    return total / len(users)


def _broadcast_first_user(model, optimizer) -> None:
    """End of the shared warm-up: copy row 0 of every user table to all users, fresh Adam."""
    with torch.no_grad():
        for table in model.user_parameters():
            table.copy_(table[0:1].expand_as(table))
            optimizer.state.pop(table, None)


def train(
    model,
    train_data: list[Comparison],
    val_data: list[Comparison] | None = None,
    config: TrainConfig | None = None,
    output_dir: str | Path | None = None,
    resume: bool = False,
    prefix_cache: PrefixCache | None = None,
) -> dict:
    """Train ``model`` in place with the Bradley-Terry loss; returns a summary.

    With ``output_dir`` it writes ``train_log.jsonl``, checkpoints (``checkpoints/last`` every
    epoch, ``checkpoints/best`` on validation), the final model (the best on validation when
    there is one) and, with validation data, ``val_metrics.json``. ``resume`` continues from
    ``checkpoints/last`` exactly: weights, optimizer, schedule, RNG and data position.
    ``prefix_cache``: a cache over the same backbone to reuse (see ``sharelora.prefix``); the
    one used is returned as ``result["prefix_cache"]``.
    """
    lock = None
    # The launcher's RANK: building accelerate's state here would fix it before the
    # Accelerator below picks the distributed type.
    if output_dir is not None and os.environ.get("RANK", "0") == "0":
        lock = OutputLock(output_dir)  # two runs writing one directory would corrupt it
        lock.acquire()
    try:
        return _train(
            model, train_data, val_data, config or TrainConfig(), output_dir, resume, prefix_cache
        )
    finally:
        if lock is not None:
            lock.release()


def _train(model, train_data, val_data, cfg: TrainConfig, output_dir, resume, prefix_cache):
    unknown = sorted({c.user for c in train_data} - set(model.users))
    if unknown:
        raise ValueError(f"training users not in the model: {', '.join(unknown[:5])}")
    set_seed(cfg.seed)
    model.max_length = cfg.max_length
    on_cpu = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    acc = Accelerator(
        # Without cpu=True, processes started by a launcher on a GPU-less machine each train
        # alone instead of forming one gloo group.
        cpu=on_cpu,
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision="bf16" if torch.cuda.is_available() else "no",
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
    out = Path(output_dir) if output_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    start = None  # the population model personal training starts from, when there is one
    population_file = out / "checkpoints" / "population.safetensors" if out else None
    if population_file and not resume and acc.is_main_process:
        population_file.unlink(missing_ok=True)  # a previous run's
    if cfg.init_from:
        from .model import PersonalizedRewardModel

        model.start_from(PersonalizedRewardModel.from_pretrained(cfg.init_from))
        start = snapshot(model)
    cache = None
    if model.adapter_config.top_layers and cfg.cache_prefix:
        model.to(acc.device)
        cache = PrefixCache(model, store=prefix_cache)
    run = PairRun(model, train_data, val_data, cfg.max_length, cache, cfg.progress)
    batches = math.ceil(len(run.train) / cfg.batch_size)
    total_steps = cfg.epochs * math.ceil(batches / cfg.grad_accum)
    sparse = cfg.sparse_users
    if acc.num_processes > 1:
        # DDP all-reduces dense gradients; row-sparse tables are a single-process path.
        if sparse == "on":
            raise ValueError("--sparse-users on needs a single process; use auto or off")
        sparse = "off"
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, sparse_users=sparse)
    scheduler = build_scheduler(optimizer, total_steps, cfg.warmup_ratio, cfg.schedule)
    wrapped, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    progress = {"epoch": 0, "step": 0, "global_step": 0, "best": None, "seconds": 0.0}
    if resume:
        last = resolve_checkpoint(out / "checkpoints" / "last") if out else None
        if last is None:
            raise TrainingError(
                f"--resume: no checkpoint in {out / 'checkpoints' if out else '(no output)'}; "
                "start without --resume"
            )
        progress = load_checkpoint(last, model, optimizer, scheduler)
        if population_file is not None and population_file.exists():
            start = load_file(population_file)
    log = (out / "train_log.jsonl").open("a") if out and acc.is_main_process else None
    started = time.time() - progress["seconds"]

    def evaluate_val(tag):
        if run.val is None:
            return None
        margins = predict_margins(wrapped, run.val, cfg.batch_size, acc, run.rewards)
        users = model.users.decode(run.val.user_ids)
        metrics = summarize(users, margins, model.adapter_config.method, "val", bootstrap=0)
        if log:
            log.write(
                json.dumps(
                    {
                        "event": "eval",
                        "at": tag,
                        **progress,
                        "val_macro_accuracy": metrics["macro_accuracy"],
                        "val_loss": metrics["loss"],
                    }
                )
                + "\n"
            )
        return metrics

    best_metrics = {}

    def checkpoint(metrics):
        progress["seconds"] = time.time() - started
        if out is None:
            return
        # Every process keeps the metrics (they are gathered), so all skip re-evaluating.
        if metrics and (progress["best"] is None or metrics["macro_accuracy"] > progress["best"]):
            progress["best"] = metrics["macro_accuracy"]
            best_metrics["val"] = metrics
            if acc.is_main_process:
                save_checkpoint(out / "checkpoints" / "best", model, optimizer, scheduler, progress)
        if acc.is_main_process:
            save_checkpoint(out / "checkpoints" / "last", model, optimizer, scheduler, progress)

    for epoch in range(progress["epoch"], cfg.epochs):
        if cfg.warmup_epochs and epoch == cfg.warmup_epochs and progress["step"] == 0:
            _broadcast_first_user(model, optimizer.optimizer)
            start = snapshot(model)
        keep = start is not None and population_file and acc.is_main_process
        if keep and not population_file.exists():  # for --resume
            population_file.parent.mkdir(parents=True, exist_ok=True)
            save_file(start, population_file)
        loader = acc.prepare(
            DataLoader(
                run.train,
                batch_size=cfg.batch_size,
                sampler=_order(run.train, cfg, epoch),
                collate_fn=run.train.collate,
                generator=_loader_generator(),
            )
        )
        skipped = acc.skip_first_batches(loader, progress["step"]) if progress["step"] else loader
        wrapped.train()
        bar = tqdm(
            skipped,
            total=len(loader),
            initial=progress["step"],
            leave=False,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not cfg.progress or not acc.is_local_main_process,
        )
        for batch in bar:
            if epoch < cfg.warmup_epochs:
                batch["user_ids"] = torch.zeros_like(batch["user_ids"])
            with acc.accumulate(wrapped):
                losses = bt_loss(run.rewards(wrapped, run.train, batch))
                loss = losses.mean()
                if cfg.user_reg and epoch >= cfg.warmup_epochs:
                    loss = loss + cfg.user_reg * user_pull(model, batch["user_ids"])
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"loss is {loss.item()} at epoch {epoch + 1} step {progress['step'] + 1}; "
                        "lower --lr; the last good checkpoint is in checkpoints/last"
                    )
                acc.backward(loss)
                if acc.sync_gradients and cfg.max_grad_norm:
                    if model.router.sparse_grads:
                        clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    else:
                        acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            progress["step"] += 1
            progress["global_step"] += int(acc.sync_gradients)
            acc_batch = (losses.detach() < math.log(2)).float().mean().item()
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc_batch:.2f}")
            if log:
                log.write(
                    json.dumps(
                        {
                            "event": "step",
                            "epoch": epoch,
                            **{k: progress[k] for k in ("step", "global_step")},
                            "loss": loss.item(),
                            "accuracy": acc_batch,
                            "lr": scheduler.get_last_lr()[0],
                        }
                    )
                    + "\n"
                )
            if (
                cfg.eval_every
                and cfg.select_best
                and acc.sync_gradients
                and progress["global_step"] % cfg.eval_every == 0
            ):
                checkpoint(evaluate_val(f"step {progress['global_step']}"))
                wrapped.train()
        progress["epoch"], progress["step"] = epoch + 1, 0
        per_epoch = cfg.select_best and not cfg.eval_every
        checkpoint(evaluate_val(f"epoch {epoch + 1}") if per_epoch else None)
    result = _finish(model, run, cfg, out, acc, progress, evaluate_val, start, best_metrics)
    if log:
        log.close()
    return result


def _finish(model, run, cfg, out, acc, progress, evaluate_val, start, best_metrics) -> dict:
    best = out / "checkpoints" / "best" / "model" / "adapters.safetensors" if out else None
    loaded = best is not None and best.exists()
    if loaded:
        model.load_trainable(best)
    metrics = best_metrics.get("val") if loaded else None
    metrics = metrics or evaluate_val("final")
    strength, metrics, tried = apply_strength(model, start, cfg.strength, metrics, evaluate_val)
    summary = {
        "config": asdict(cfg),
        "train_pairs": len(run.train),
        "val_pairs": len(run.val) if run.val else 0,
        "truncated_texts": run.truncated,
        "steps": progress["global_step"],
        "processes": acc.num_processes,
        "seconds": round(progress["seconds"], 1),
        "best_val_macro_accuracy": progress["best"],
        "strength": strength,
        "strength_val": {
            str(g): {"macro_accuracy": m["macro_accuracy"], "loss": m["loss"]}
            for g, m in sorted(tried.items())
        },
        "parameters": model.parameter_report(),
    }
    if out and acc.is_main_process:
        model.save_pretrained(out, training=summary)
        if metrics:
            write_json(out / "val_metrics.json", metrics)
    acc.wait_for_everyone()
    return {"summary": summary, "val_metrics": metrics, "prefix_cache": run.cache}

"""Shared pieces of the benchmarks: the setting, one training step, timing and output."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sharelora import DEFAULT_BACKBONE
from sharelora.backbone import load_backbone


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--quick", action="store_true", help="fewer repeats and sizes")
    p.add_argument("--json", help="write the results here")
    return p


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )


def minilm():
    """A fresh MiniLM sequence-classification backbone and its tokenizer."""
    model, tokenizer, _ = load_backbone(DEFAULT_BACKBONE)
    return model, tokenizer


def pair_batch(
    pairs: int = 16, length: int = 128, users: int = 5, vocab: int = 30522, seed: int = 0
) -> dict:
    """``2*pairs`` rows of ``length`` random tokens (chosen first) and ids cycling over users."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (2 * pairs, length), generator=g)
    user_ids = torch.arange(pairs) % users
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "user_ids": torch.cat([user_ids, user_ids]),
    }


def bt_step(forward, optimizer, batch) -> None:
    """Forward all ``2B`` rows at once, Bradley-Terry loss, backward, optimizer step."""
    rewards = forward(batch)
    chosen, rejected = rewards.chunk(2)
    loss = -F.logsigmoid(chosen - rejected).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def interleaved_median(
    steps: dict, rounds: int, warmup: int = 1, reduce=statistics.median
) -> dict[str, float]:
    """Seconds per call of each function (median of the rounds, or ``reduce``), run in turns
    so that drift hits all alike."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: reduce(ts) for name, ts in times.items()}


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1))


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    sd_text = f" ± {sd:.3f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.3f}{sd_text} ({len(values)})"


def grid_table(title: str, ns: list[str], methods: list[str], cell) -> list[str]:
    """Markdown lines: one row per method whose ``cell(n, method)`` is not all "—"."""
    lines = [
        title,
        "",
        "| method | " + " | ".join(f"n={n}" for n in ns) + " |",
        "|---|" + "---:|" * len(ns),
    ]
    for method in methods:
        row = [cell(n, method) for n in ns]
        if any(r != "—" for r in row):
            lines.append(f"| {method} | " + " | ".join(row) + " |")
    return lines + [""]

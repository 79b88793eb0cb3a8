"""Deterministic kernels for a block of work (``TrainConfig.deterministic``)."""

from __future__ import annotations

import contextlib
import os

import torch


@contextlib.contextmanager
def deterministic_mode(on: bool):
    """Deterministic kernels for the block when ``on`` (``TrainConfig.deterministic``); the
    previous setting comes back after it. CUDA's cuBLAS needs its workspace setting too."""
    if not on:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]

"""Crash-safe file writes and the output-directory lock.

Every file a run writes goes to a temporary name in the same directory, is flushed to disk,
then renamed over the target: a run killed at any moment leaves the old file or the new one,
never a torn file that loads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

from safetensors.torch import save_file

# What a fresh run removes from its output directory: a previous run's state must never be
# read back as this run's (its best checkpoint, its log, its metrics).
RUN_STATE = ("checkpoints", "train_log.jsonl", "val_metrics.json", "metrics.json")


def clear_run_state(directory: Path) -> None:
    """Remove a previous run's ``RUN_STATE`` from ``directory``."""
    for name in RUN_STATE:
        path = directory / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = _tmp(path)
    tmp.write_text(text, encoding="utf-8")
    _replace(tmp, path)


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, ensure_ascii=False))


def save_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    path = Path(path)
    tmp = _tmp(path)
    save_file(tensors, tmp, metadata=metadata)
    _replace(tmp, path)


class LockError(RuntimeError):
    """The output directory is in use by another live run."""


class OutputLock:
    """``DIR/.sharelora.lock`` holding the owner's pid and host; refused while that process
    lives, taken over when it is gone (a stale lock from a killed run)."""

    NAME = ".sharelora.lock"

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / self.NAME
        self.held = False

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by someone else
            return True
        return True

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    owner = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    owner = {}
                pid = owner.get("pid")
                same_host = owner.get("host") == me["host"]
                if isinstance(pid, int) and (pid == me["pid"] or not same_host or self._alive(pid)):
                    if pid == me["pid"]:
                        return
                    raise LockError(
                        f"{self.path.parent} is in use by process {pid} on "
                        f"{owner.get('host')} (lock {self.path}); wait for it to finish or "
                        "choose another --output"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise LockError(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def run_lock(directory: str | Path | None):
    """The output lock of a run, taken by the launcher's rank 0 only (``RANK`` is read from the
    environment: building accelerate's state here would fix it too early); a no-op elsewhere
    and without a directory."""
    if directory is None or os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    return OutputLock(directory)

"""Faults: SIGKILL mid-run then --resume, torn or foreign files, concurrent runs, atomic writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import opposite_tastes
from safetensors.torch import load_file

from sharelora import PersonalizedRewardModel, files
from sharelora.cli import main
from sharelora.files import LockError, OutputLock
from sharelora.model import ModelFormatError


def _data(tmp_path) -> str:
    path = tmp_path / "prefs.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {"prompt": c.prompt, "chosen": c.chosen, "rejected": c.rejected, "user": c.user}
            )
            + "\n"
            for c in opposite_tastes(16)
        )
    )
    return str(path)


def _train_cmd(backbone, data, out, *extra):
    return [
        sys.executable,
        "-m",
        "sharelora.cli",
        "train",
        "--data",
        data,
        "--backbone",
        backbone,
        "--output",
        str(out),
        "--epochs",
        "3",
        "--batch-size",
        "4",
        "--rank",
        "2",
        "--max-length",
        "32",
        "--dropout",
        "0.1",
        "--eval-every",
        "1",
        "--deterministic",  # what makes a resumed run bit-identical (the README's promise)
        "--no-progress",
        *extra,
    ]


def _global_step(out: Path) -> int:
    state = out / "checkpoints" / "last" / "trainer_state.json"
    try:
        return json.loads(state.read_text())["progress"]["global_step"]
    except (OSError, ValueError, KeyError):
        return 0


# The run chooses on validation in OUTPUT/select, then refits in OUTPUT: a kill in either. The
# refit checkpoints at each epoch's end (16 steps: the users' pairs and the population's), and
# it trains all 3 epochs when no best epoch is chosen, and at a fixed strength (a refit that
# serves the shared start takes no step).
@pytest.mark.parametrize(
    "phase,kill_after,extra",
    [
        ("select", 5, ()),
        ("select", 13, ()),
        ("", 16, ("--no-select-best", "--strength", "1")),
    ],
)
def test_sigkill_then_resume_equals_uninterrupted(
    tiny_text_backbone, tmp_path, phase, kill_after, extra
):
    data = _data(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        _train_cmd(tiny_text_backbone, data, tmp_path / "full", *extra),
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        _train_cmd(tiny_text_backbone, data, cut, *extra),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while _global_step(cut / phase) < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # wherever it is, even inside a checkpoint write
    proc.wait()
    assert not (cut / "adapters.safetensors").exists(), "the run finished before the kill"
    assert json.loads((cut / ".sharelora.lock").read_text())["pid"] == proc.pid  # now stale
    done = subprocess.run(
        _train_cmd(tiny_text_backbone, data, cut, *extra, "--resume"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    a = load_file(tmp_path / "full" / "adapters.safetensors")
    b = load_file(cut / "adapters.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bit-identical
    assert json.loads((tmp_path / "full" / "metrics.json").read_text()) == json.loads(
        (cut / "metrics.json").read_text()
    )
    assert not (cut / ".sharelora.lock").exists()


@pytest.fixture
def saved(tiny_text_backbone, tmp_path):
    model = PersonalizedRewardModel.from_backbone(tiny_text_backbone, ["a", "b"])
    model.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _corrupt(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "garbage":
        path.write_bytes(b"\x00not safetensors at all")
    elif how == "missing":
        path.unlink()


@pytest.mark.parametrize("how", ["truncated", "garbage", "missing"])
def test_broken_weights_file_is_named(saved, how, capsys):
    _corrupt(saved / "adapters.safetensors", how)
    with pytest.raises(ModelFormatError, match="adapters.safetensors"):
        PersonalizedRewardModel.from_pretrained(saved)
    assert main(["eval", "--model", str(saved), "--data", "builtin:demo"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("sharelora: error:") and "adapters.safetensors" in last
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "change,message",
    [
        ({"format_version": 99}, "format_version 99 is not supported"),
        ({"num_users": 3}, "2 users but sharelora.json says 3"),
        ({"adapter": {"method": "sharelora", "rank": 4}}, "has shape"),
        ({"adapter": {"method": "diag", "rank": 8}}, "missing"),
    ],
)
def test_config_that_disagrees_with_files(saved, change, message):
    config = json.loads((saved / "sharelora.json").read_text())
    config.update(change)
    (saved / "sharelora.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match=message):
        PersonalizedRewardModel.from_pretrained(saved)


def test_unreadable_config_and_users(saved):
    (saved / "users.json").write_text("{not json")
    with pytest.raises(ValueError, match="users.json"):
        PersonalizedRewardModel.from_pretrained(saved)
    (saved / "sharelora.json").write_text("[]")
    with pytest.raises(ModelFormatError, match="sharelora.json: format_version None"):
        PersonalizedRewardModel.from_pretrained(saved)


def test_second_run_on_one_output_is_refused(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / OutputLock.NAME
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename}))
        with pytest.raises(LockError, match=f"in use by process {sleeper.pid}"):
            OutputLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    with OutputLock(tmp_path) as taken:  # the owner is gone: a stale lock is taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid() and taken.held
    assert not lock.exists()


def test_write_killed_before_rename_leaves_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    files.write_json(target, {"v": 1})

    def crash(*args):
        raise KeyboardInterrupt  # as if killed between writing and renaming

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        files.write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}

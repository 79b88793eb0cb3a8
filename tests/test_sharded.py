"""User-sharded training (``sharelora.shard``): two CPU processes on gloo, each holding half of
the users, against one process holding them all, fed the same global batches.

Launched as `tests/test_distributed.py` does (``--multi_gpu`` on a GPU-less machine starts one
CPU process per rank).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import LAUNCH_TWO, randomize, save_text_backbone
from safetensors.torch import load_file

from sharelora import AdapterConfig, PersonalizedRewardModel
from sharelora.score import score_texts

HERE = Path(__file__).parent
# One process sums a batch's gradient in one order, two processes in halves and then an
# all-reduce (~1e-7 apart); Adam divides each coordinate by its own gradient scale, so a
# coordinate whose gradient is near zero moves by up to its learning rate on rounding alone.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A backbone without dropout (draws differ per process) and a shared start whose shared
    factors are non-zero, so that every user's rows get gradients."""
    root = tmp_path_factory.mktemp("sharded")
    backbone = save_text_backbone(
        root / "backbone", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    shared = PersonalizedRewardModel.from_backbone(
        backbone, ["anyone"], AdapterConfig(method="shared", rank=2)
    )
    randomize(shared, scale=0.2)
    shared.save_pretrained(root / "start")
    return backbone, str(root / "start")


def _run(args: list[str], cwd: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _train(setup, tmp_path, mode: str, processes: int) -> tuple[Path, dict]:
    """The run's directory and its test metrics, which every process reports alike."""
    backbone, start = setup
    out = tmp_path / f"{mode}-{processes}"
    job = [str(HERE / "shard_job.py"), backbone, start, str(out), mode]
    printed = _run((LAUNCH_TWO if processes > 1 else []) + job, tmp_path)
    assert [p["processes"] for p in printed] == [processes] * processes
    assert [p["users"] for p in printed] == [6 // processes] * processes  # N/P users each
    assert all(p["test"] == printed[0]["test"] for p in printed)
    return out, printed[0]["test"]


def _assert_same_model(one: Path, two: Path) -> None:
    assert json.loads((one / "users.json").read_text()) == json.loads(
        (two / "users.json").read_text()
    )
    for name in ("adapters.safetensors", "population.safetensors"):
        a, b = load_file(one / name), load_file(two / name)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].shape == b[key].shape, key
            torch.testing.assert_close(a[key], b[key], atol=TOLERANCE, rtol=TOLERANCE)


def test_plan_balances_pairs_then_users(monkeypatch):
    """Users are dealt by pair count; users without training pairs (they still hold rows and
    optimizer state) go to the process holding fewer users, not all to the first."""
    from types import SimpleNamespace

    from sharelora import shard as shard_module
    from sharelora.data import Comparison

    state = SimpleNamespace(num_processes=2, process_index=0)
    monkeypatch.setattr(shard_module, "_state", lambda: state)
    users = [f"u{i}" for i in range(8)]
    data = [
        Comparison("p", "a", "b", u)
        for u, n in zip(users, [5, 3, 2, 0, 0, 0, 0, 0], strict=True)
        for _ in range(n)
    ]
    shard = shard_module.plan(users, data, personalized=True)
    # u0 (5 pairs) to rank 0; u1 (3) and u2 (2) to rank 1: 5 pairs each. The five users
    # without pairs go where fewer users sit: u3 to rank 0 (1 user against 2), then ties
    # (2 and 2) to the lowest rank, so they alternate.
    assert shard.local_users(users) == ["u0", "u3", "u4", "u6"]
    assert shard.record(data)["users_per_process"] == [4, 4]
    assert shard.record(data)["pairs_per_process"] == [5, 5]
    assert shard_module.plan(users, data, personalized=False) is None


@pytest.mark.parametrize("mode", ["frozen", "trained"])
def test_sharded_training_matches_one_process(setup, tmp_path, mode):
    (one, test1), (two, test2) = _train(setup, tmp_path, mode, 1), _train(setup, tmp_path, mode, 2)
    _assert_same_model(one, two)
    # Every test row is scored once, the stranger's 3 by the population.
    assert test1["n"] == test2["n"] == 21 + 3
    assert (
        test1["unknown_users"]
        == test2["unknown_users"]
        == {
            "policy": "population",
            "users": 1,
            "rows": 3,
        }
    )
    assert test2["macro_accuracy"] == pytest.approx(test1["macro_accuracy"], abs=1e-6)
    summary = json.loads((two / "sharelora.json").read_text())["training"]
    assert summary["shard"]["users_per_process"] == [3, 3]
    # Pairs are dealt by count: users have 6..11 training pairs (51 in all; 26 and 25 per
    # process), and the refit adds 2..7 validation pairs each (40 and 38).
    expected = {"frozen": [26, 25], "trained": [40, 38]}[mode]
    assert summary["shard"]["pairs_per_process"] == expected
    assert (
        summary["train_pairs"]
        == json.loads((one / "sharelora.json").read_text())["training"]["train_pairs"]
    )
    m1 = json.loads((one / "val_metrics.json").read_text())
    m2 = json.loads((two / "val_metrics.json").read_text())
    assert m1["n"] == m2["n"] and m1["users"].keys() == m2["users"].keys()
    assert m2["macro_accuracy"] == pytest.approx(m1["macro_accuracy"], abs=1e-6)
    rank_dirs = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert rank_dirs == ["rank-0-of-2", "rank-1-of-2"]  # each process its own users' state
    assert summary["steps"] > 0
    if mode == "frozen":
        start = load_file(Path(setup[1]) / "adapters.safetensors")
        trained = load_file(two / "adapters.safetensors")
        shared = [k for k in start if k in trained and start[k].shape == trained[k].shape]
        assert shared and all(torch.equal(start[k], trained[k]) for k in shared)

    # The merged model is one model: a single process loads it and scores every user.
    model = PersonalizedRewardModel.from_pretrained(two)
    reference = PersonalizedRewardModel.from_pretrained(one)
    users = ["user0", "user1", "user5", "user2"]
    responses = ["yes apple river", "no stone lamp", "yes lamp tree", "no book train"]
    got = score_texts(model, ["question 1?"] * 4, responses, users)
    want = score_texts(reference, ["question 1?"] * 4, responses, users)
    torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(want), atol=1e-3, rtol=0)


def _data_file(tmp_path: Path) -> str:
    from shard_job import tastes

    path = tmp_path / "prefs.jsonl"
    keys = ("prompt", "chosen", "rejected", "user")
    rows = [json.dumps({k: getattr(c, k) for k in keys}) for c in tastes(0, 10)]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def _cli(backbone: str, data: str, out: Path, *extra: str) -> list[str]:
    return [
        *LAUNCH_TWO,
        "-m",
        "sharelora.cli",
        "train",
        *("--data", data, "--backbone", backbone, "--output", str(out)),
        *("--epochs", "2", "--batch-size", "4", "--rank", "2", "--max-length", "32"),
        *("--no-select-best", "--strength", "1"),  # the refit trains, checkpointing each epoch
        "--deterministic",
        "--no-progress",
        *extra,
    ]


def _global_step(out: Path) -> int:
    state = out / "checkpoints" / "rank-0-of-2" / "last" / "trainer_state.json"
    try:
        return json.loads(state.read_text())["progress"]["global_step"]
    except (OSError, ValueError, KeyError):
        return 0


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the launcher's worker of ``rank`` (from /proc: its parent and RANK)."""
    parent = {}
    for proc in Path("/proc").iterdir():
        try:
            parent[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            continue
    below, frontier = set(), {launcher}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - below
        below |= frontier
    for pid in below:
        try:
            env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds a rank in /proc")
def test_cli_sigkill_of_one_rank_then_resume_equals_uninterrupted(setup, tmp_path):
    backbone, _ = setup
    data = _data_file(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    done = subprocess.run(
        [sys.executable, *_cli(backbone, data, full)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("macro accuracy") == 1  # one report, from the main process
    summary = json.loads((full / "sharelora.json").read_text())["training"]
    assert summary["processes"] == 2 and summary["shard"]["users_per_process"] == [3, 3]

    cut = tmp_path / "cut"
    launcher = subprocess.Popen(
        [sys.executable, *_cli(backbone, data, cut)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while _global_step(cut) < 1 and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim = _rank_pid(launcher.pid, 1)
    assert victim is not None, "rank 1 not found"
    os.kill(victim, signal.SIGKILL)  # one rank, wherever it is; the launcher stops the other
    launcher.wait(timeout=120)
    assert launcher.returncode != 0
    assert not (cut / "adapters.safetensors").exists(), "the run finished before the kill"

    one = subprocess.run(  # a resume must use as many processes
        [sys.executable, *_cli(backbone, data, cut, "--resume")[len(LAUNCH_TWO) :]],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 2 and "another number of processes" in one.stderr
    done = subprocess.run(
        [sys.executable, *_cli(backbone, data, cut, "--resume")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_file(full / "adapters.safetensors"), load_file(cut / "adapters.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    log = [json.loads(line) for line in (cut / "train_log.jsonl").read_text().splitlines()]
    assert [e["global_step"] for e in log if e["event"] == "step"][-1] == summary["steps"]
    assert log[0]["global_step"] > 1  # continued from the checkpoint, not from the start
    assert json.loads((full / "metrics.json").read_text()) == json.loads(
        (cut / "metrics.json").read_text()
    )

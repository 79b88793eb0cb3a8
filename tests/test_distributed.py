"""Two CPU processes under `accelerate launch` (gloo DDP) match one process with the same
global batch: weights to float tolerance, validation metrics exactly.

With accelerate 1.15, `accelerate launch --cpu --num_processes 2` starts a single process;
`--multi_gpu --num_processes 2` on a machine without GPUs starts two CPU processes on gloo
(torchrun underneath), which is what this test needs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LAUNCH_TWO, save_text_backbone
from safetensors.torch import load_file

HERE = Path(__file__).parent
# Summation order differs between one process and an all-reduce of two halves (~1e-7), and
# Adam divides each coordinate by its own gradient scale, so a coordinate whose gradient is
# near zero can move by up to its learning rate on rounding alone; 1e-4 bounds that here.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def no_dropout_backbone(tmp_path_factory):
    """Dropout draws differ per process, so the comparison needs a model without it."""
    return save_text_backbone(
        tmp_path_factory.mktemp("no-dropout"),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def _run(cmd, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_two_processes_match_one(no_dropout_backbone, tmp_path):
    job = str(HERE / "ddp_job.py")
    single = _run([sys.executable, job, no_dropout_backbone, str(tmp_path / "one")], tmp_path)
    assert "processes: 1" in single
    double = _run(
        [
            sys.executable,
            *LAUNCH_TWO,
            job,
            no_dropout_backbone,
            str(tmp_path / "two"),
        ],
        tmp_path,
    )
    assert double.count("processes: 2") == 2
    one = load_file(tmp_path / "one" / "adapters.safetensors")
    two = load_file(tmp_path / "two" / "adapters.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(one[name], two[name], atol=TOLERANCE, rtol=TOLERANCE)
    m1 = json.loads((tmp_path / "one" / "val_metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "val_metrics.json").read_text())
    assert m1["n"] == m2["n"] == 10  # every validation pair counted once across ranks
    assert {u: v["n"] for u, v in m1["users"].items()} == {
        u: v["n"] for u, v in m2["users"].items()
    }
    assert m1["macro_accuracy"] == m2["macro_accuracy"]

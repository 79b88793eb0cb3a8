"""`sharelora plan`: budgets from the config alone (meta device), no weights loaded."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig

from sharelora.cli import main

GIB = 1024**3


@pytest.fixture(scope="module")
def llama3_8b_config(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama3-8b")
    LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ).save_pretrained(d)
    return str(d)


def test_llama3_8b_budget_from_config(llama3_8b_config, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert (
        main(
            [
                "plan",
                "--backbone",
                llama3_8b_config,
                "--rank",
                "32",
                "--targets",
                "q_proj,v_proj",
                "--users",
                "100000",
                "--dtype",
                "bfloat16",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    plan = json.loads(out.read_text())["methods"]
    # 32 layers; q_proj 4096->4096, v_proj 4096->1024 (8 KV heads of 128), r = 32
    assert plan["sharelora"]["per_user"] == 32 * 32 * (4096 + 4096)
    assert plan["sharelora"]["shared"] == 32 * 32 * (4096 + 1024) + 4096  # B's + score head
    assert plan["sharelora-b"]["per_user"] == 32 * 32 * (4096 + 1024)
    assert plan["independent"]["per_user"] == 32 * 32 * (4096 + 4096 + 4096 + 1024)
    assert plan["core"]["per_user"] == 32 * 2 * 32 * 32
    assert plan["diag"]["per_user"] == 32 * 2 * 32
    assert plan["shared"]["frozen"] == 7_504_924_672
    text = capsys.readouterr().out
    assert "recommended at 100,000 users with full user state: diag" in text
    assert "| **sharelora** |" in text


def test_minilm_plan_matches_the_built_model(capsys):
    assert main(["plan", "--users", "10000", "--memory-gib", "16"]) == 0
    text = capsys.readouterr().out
    assert "| **sharelora** | 36,864 | 37,248 | 368,677,248 |" in text
    assert "recommended at 10,000 users with full user state: sharelora" in text


def test_plan_rejects_bad_input(capsys):
    assert main(["plan", "--users", "0"]) == 2
    assert "--users must be a positive integer" in capsys.readouterr().err
    assert main(["plan", "--users", "5", "--backbone", "/nonexistent/model"]) == 2
    assert "cannot read the config" in capsys.readouterr().err


def test_rowwise_state_costs_one_scalar_and_one_count_per_user_row():
    from sharelora.plan import budget

    counts = {"frozen": 10, "shared": 100, "per_user": 1000, "user_tables": 4}
    full = budget(counts, users=50, user_state="full")
    rowwise = budget(counts, users=50, user_state="rowwise")
    assert full["optimizer_gib"] * GIB == 2 * (100 + 1000 * 50) * 4
    assert rowwise["optimizer_gib"] * GIB == 2 * 100 * 4 + 50 * 4 * (4 + 8)
    assert rowwise["optimizer_full_gib"] == full["optimizer_gib"]
    # Host tables: the user tables and their state on the host; the device keeps the frozen
    # weights, shared factors (weights, gradients, Adam's two moments) and the batch's rows.
    assert rowwise["host_tables_host_gib"] * GIB == 50 * 1000 * 4 + 50 * 4 * (4 + 8)
    assert full["host_tables_device_gib"] * GIB == 10 * 4 + 100 * 4 * 4 + 2 * 1000 * 16 * 4

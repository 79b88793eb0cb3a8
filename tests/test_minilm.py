"""The real packaged all-MiniLM-L6-v2 backbone: loading, parameter budget, tokenizer travel."""

from __future__ import annotations

import pytest
import torch

from sharelora import DEFAULT_BACKBONE, AdapterConfig, PersonalizedRewardModel

# 6 layers x (query, value), each 384 -> 384, r = 8; the head is Linear(384, 1), whose bias
# stays frozen (it cancels in the Bradley-Terry loss).
MODULES, D, R, HEAD = 12, 384, 8, 384
BUDGET = {
    #  method:       (shared incl. head,          per user)
    "shared": (MODULES * 2 * R * D + HEAD, 0),
    "independent": (HEAD, MODULES * 2 * R * D),
    "sharelora": (MODULES * R * D + HEAD, MODULES * R * D),
    "sharelora-b": (MODULES * R * D + HEAD, MODULES * R * D),
    "core": (MODULES * 2 * R * D + HEAD, MODULES * R * R),
    "diag": (MODULES * 2 * R * D + HEAD, MODULES * R),
}


@pytest.fixture(scope="module")
def minilm():
    return PersonalizedRewardModel.from_backbone(DEFAULT_BACKBONE, ["ann", "bob", "cy"])


@pytest.mark.parametrize("method", list(BUDGET))
def test_parameter_report(method):
    model = PersonalizedRewardModel.from_backbone(
        DEFAULT_BACKBONE, ["ann", "bob", "cy"], AdapterConfig(method=method, rank=R)
    )
    report = model.parameter_report()
    shared, per_user = BUDGET[method]
    assert (report["shared"], report["per_user"]) == (shared, per_user)
    assert report["trainable"] == shared + 3 * per_user
    assert report["frozen"] == 22_713_216 + 1  # the MiniLM body and the head's scalar bias
    assert model.adapter_config.targets == ["query", "value"]


def test_text_round_trip_with_tokenizer(minilm, tmp_path):
    model = minilm.eval()
    assert model.tokenizer is not None
    batch = model.tokenizer(["a polite answer", "a rude one"], padding=True, return_tensors="pt")
    users = model.users.encode(["bob", "ann"])
    with torch.no_grad():
        before = model(**batch, user_ids=users)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    loaded = PersonalizedRewardModel.from_pretrained(tmp_path).eval()
    assert loaded.backbone_name == DEFAULT_BACKBONE
    with torch.no_grad():
        assert torch.equal(loaded(**batch, user_ids=users), before)

"""Bad input gives one clear message."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_batch

from sharelora import AdapterConfig, PersonalizedRewardModel, UserVocab


@pytest.fixture
def model(tiny_dirs):
    cfg = AdapterConfig(method="sharelora", rank=2)
    return PersonalizedRewardModel.from_backbone(tiny_dirs["llama"], ["a", "b"], adapter=cfg)


def test_missing_user_ids(model):
    ids, mask = tiny_batch(batch=2)
    with pytest.raises(ValueError, match="personalized: pass user_ids"):
        model(input_ids=ids, attention_mask=mask)


def test_out_of_range_user_ids(model):
    ids, mask = tiny_batch(batch=2)
    with pytest.raises(ValueError, match=r"out of range.*2 users"):
        model(input_ids=ids, attention_mask=mask, user_ids=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="out of range"):
        model(input_ids=ids, attention_mask=mask, user_ids=torch.tensor([-1, 0]))


def test_batch_size_mismatch(model):
    ids, mask = tiny_batch(batch=3)
    with pytest.raises(ValueError, match="user_ids has 2 entries but the batch has 3 rows"):
        model(input_ids=ids, attention_mask=mask, user_ids=torch.tensor([0, 1]))


def test_float_user_ids_rejected(model):
    ids, mask = tiny_batch(batch=2)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        model(input_ids=ids, attention_mask=mask, user_ids=torch.tensor([0.0, 1.0]))


def test_layer_checks_batch_size_itself(model):
    layer = next(iter(model.adapter_layers.values()))
    x = torch.randn(3, 5, layer.in_features)
    with model.router.route(torch.tensor([0, 1])), pytest.raises(ValueError, match="2 entries"):
        layer(x)
    with pytest.raises(ValueError, match="pass user_ids"):
        layer(x)


def test_target_that_matches_nothing_lists_linear_layers(tiny_dirs):
    cfg = AdapterConfig(targets=["query", "nonexistent"])
    with pytest.raises(ValueError, match=r"nonexistent.*named: .*q_proj.*v_proj"):
        PersonalizedRewardModel.from_backbone(tiny_dirs["llama"], ["a"], adapter=cfg)


def test_data_parallel_replica_is_refused(model):
    # nn.parallel.replicate marks every replica this way; CPU has no devices to replicate onto.
    replica = model._replicate_for_data_parallel()
    ids, mask = tiny_batch(batch=2)
    with pytest.raises(RuntimeError, match="accelerate launch"):
        replica(input_ids=ids, attention_mask=mask, user_ids=torch.tensor([0, 1]))


def test_deepcopy_gives_independent_working_model(model):
    twin = copy.deepcopy(model)
    ids, mask = tiny_batch(batch=2)
    users = torch.tensor([1, 0])
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask, user_ids=users),
            twin(input_ids=ids, attention_mask=mask, user_ids=users),
        )
    assert twin.router is not model.router


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"method": "lora"}, "method must be one of shared, sharelora, sharelora-head"),
        ({"rank": 0}, "rank must be a positive integer"),
        ({"alpha": -1}, "alpha must be a positive number"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"targets": []}, "targets must be non-empty"),
        ({"user_init": "random"}, "user_init must be one of"),
    ],
)
def test_adapter_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**kwargs)


def test_targets_accept_comma_string():
    assert AdapterConfig(targets="query, value").targets == ["query", "value"]


def test_user_vocab_normalizes_types_and_reports_unknown():
    vocab = UserVocab([1, "2", 3.0])
    assert vocab.encode(["1", 2, 3]).tolist() == [0, 1, 2]
    assert "1" in vocab and 1 in vocab and "4" not in vocab
    with pytest.raises(KeyError, match="unknown user '4'"):
        vocab.id(4)
    with pytest.raises(ValueError, match="string or an integer"):
        vocab.add([1.5])
    assert vocab.add(["9", 1]) == [3, 0]
    assert vocab.decode(torch.tensor([3, 0])) == ["9", "1"]


def test_user_vocab_round_trip(tmp_path):
    vocab = UserVocab(["zoë", "bob", 7])
    vocab.save(tmp_path / "users.json")
    assert UserVocab.load(tmp_path / "users.json") == vocab

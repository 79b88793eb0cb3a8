"""Onboarding new users: only their rows train; existing users stay bit-identical."""

from __future__ import annotations

import pytest
import torch
from conftest import opposite_tastes

from sharelora import AdapterConfig, PersonalizedRewardModel, population
from sharelora.data import Comparison
from sharelora.evaluate import evaluate
from sharelora.onboard import onboard
from sharelora.population import POPULATION
from sharelora.recipe import TrainConfig, train
from sharelora.score import score_texts
from sharelora.users import UnknownUserError

# The toy's lr is 5x the default, for few steps; its user rows overshoot at 4x that (the
# default user_lr_scale), so here they step at lr (onboarding at 2e-2 or 4e-2 missed 0.8).
CFG = TrainConfig(epochs=8, lr=1e-2, user_lr_scale=1, batch_size=8, progress=False, max_length=32)


def cloudy(n, seed=0):
    """A new user who likes 'yes' like sunny."""
    return [
        Comparison(c.prompt, c.chosen, c.rejected, "cloudy")
        for c in opposite_tastes(n, seed)
        if c.user == "sunny"
    ]


# sharelora-head onboards two tables per user: the A_u rows and the score-head offset.
@pytest.fixture(scope="module", params=["sharelora", "sharelora-head"])
def trained(tiny_text_backbone, request):
    torch.manual_seed(0)
    model = PersonalizedRewardModel.from_backbone(
        tiny_text_backbone,
        ["sunny", "rainy"],
        AdapterConfig(method=request.param, rank=4),
        max_length=32,
    )
    train(model, opposite_tastes(40), None, CFG)
    return model


def test_onboarding_fits_new_user_and_leaves_others_bit_identical(trained, tmp_path):
    model = PersonalizedRewardModel.from_pretrained(_save(trained, tmp_path / "base"))
    texts = ["yes apple river", "no stone lamp", "yes tree book"]
    before = score_texts(model, None, texts * 2, ["sunny"] * 3 + ["rainy"] * 3)
    frozen = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    onboard(model, cloudy(10), None, CFG, tmp_path / "onboarded")
    assert model.users.names == ["sunny", "rainy", "cloudy"]
    assert score_texts(model, None, texts * 2, ["sunny"] * 3 + ["rainy"] * 3) == before
    after = model.trainable_state_dict()
    for name, old in frozen.items():
        new = after[name]
        assert torch.equal(
            new[: old.shape[0]] if name.split(".")[-1].startswith("user_") else new, old
        ), name
    held_out = cloudy(20, seed=5)
    assert evaluate(model, held_out)["macro_accuracy"] >= 0.8
    reloaded = PersonalizedRewardModel.from_pretrained(tmp_path / "onboarded")
    assert reloaded.num_users == 3
    # A new model instance may round differently in the last bit; the weights are the same.
    assert score_texts(reloaded, None, texts, ["sunny"] * 3) == pytest.approx(before[:3], abs=1e-6)


def _save(model, path):
    model.save_pretrained(path)
    return path


def test_new_rows_start_at_the_population(trained, tmp_path):
    model = PersonalizedRewardModel.from_pretrained(_save(trained, tmp_path))
    # Training with a prior stored its center (where every user started) as the population.
    assert model.population is not None
    start = population.of(model)
    tables = {n: t.detach().clone() for n, t in population.user_tables(model).items()}
    (new_id,) = model.add_users(["zed"])
    for name, grown in population.user_tables(model).items():
        torch.testing.assert_close(grown[new_id], start[name][0])
        assert torch.equal(grown[:new_id], tables[name])
    assert model.router.num_users == 3
    model.population = None  # without a stored population: the mean over users
    (other,) = model.add_users(["yan"])
    for grown in model.user_parameters():
        torch.testing.assert_close(grown[other], grown[:other].mean(0))


def test_unknown_user_is_an_error_unless_population_asked(trained, tmp_path):
    model = PersonalizedRewardModel.from_pretrained(_save(trained, tmp_path))
    with pytest.raises(UnknownUserError, match="unknown user 'zed'"):
        score_texts(model, None, ["yes"], ["zed"])
    rewards = score_texts(
        model, None, ["yes", "yes"], ["zed", POPULATION], unknown_user="population"
    )
    assert rewards[0] == pytest.approx(rewards[1], abs=1e-6)  # same row, batch rounding aside
    assert model.users.names[-1] == POPULATION
    start = population.of(model)
    for name, table in population.user_tables(model).items():
        torch.testing.assert_close(table[-1], start[name][0])


def test_onboarding_refuses_known_users_and_shared_models(trained, tiny_text_backbone):
    with pytest.raises(ValueError, match="already knows: rainy, sunny"):
        onboard(trained, opposite_tastes(2), None, CFG)
    shared = PersonalizedRewardModel.from_backbone(
        tiny_text_backbone, ["a"], AdapterConfig(method="shared")
    )
    with pytest.raises(ValueError, match="no per-user factors"):
        onboard(shared, cloudy(2), None, CFG)

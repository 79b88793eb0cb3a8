"""Training: it learns, resumes exactly, warms up as the reference recipe, stops on NaN."""

from __future__ import annotations

import pytest
import torch
from conftest import opposite_tastes

from sharelora import AdapterConfig, PersonalizedRewardModel, population
from sharelora import train as train_module
from sharelora.evaluate import evaluate
from sharelora.train import TrainConfig, TrainingError, train


def _model(path, method="sharelora", **kw):
    torch.manual_seed(0)
    return PersonalizedRewardModel.from_backbone(
        path, ["sunny", "rainy"], AdapterConfig(method=method, rank=4, **kw)
    )


def _cfg(**kw) -> TrainConfig:
    """A short run on the tiny backbone."""
    return TrainConfig(**{"lr": 5e-3, "progress": False, "max_length": 32, **kw})


@pytest.mark.parametrize("sparse_users", ["off", "on"])
def test_really_learns_opposite_tastes(tiny_text_backbone, sparse_users):
    data = opposite_tastes(40)
    test = opposite_tastes(15, seed=1)
    model = _model(tiny_text_backbone)
    before = evaluate(model, test)["macro_accuracy"]
    cfg = TrainConfig(
        epochs=6, lr=1e-2, batch_size=8, progress=False, max_length=32, sparse_users=sparse_users
    )
    result = train(model, data, test, cfg)
    after = evaluate(model, test)["macro_accuracy"]
    assert after >= 0.9 > before + 0.2, (before, after)
    assert result["val_metrics"]["macro_accuracy"] == after
    # The shared model cannot serve both tastes at once.
    shared = _model(tiny_text_backbone, method="shared")
    train(shared, data, None, cfg)
    assert evaluate(shared, test)["macro_accuracy"] < 0.7


@pytest.mark.parametrize("top_layers,warmup_epochs", [(None, 0), (1, 0), (None, 1)])
def test_resume_equals_uninterrupted(
    tiny_text_backbone, tmp_path, monkeypatch, top_layers, warmup_epochs
):
    # With a warm-up the cut falls in the personal stage: the strength chosen at the end needs
    # the population saved at the end of the warm-up.
    data = opposite_tastes(12)
    cfg = _cfg(epochs=3, batch_size=4, eval_every=2, warmup_epochs=warmup_epochs)
    kw = {"dropout": 0.1, "top_layers": top_layers}  # dropout: RNG state must be restored too
    full = _model(tiny_text_backbone, **kw)
    expected = train(full, data, data[:6], cfg, tmp_path / "full")["summary"]

    saved = []
    real_save = train_module.save_checkpoint

    def save_then_crash(directory, *args):
        real_save(directory, *args)
        if directory.name == "last":
            saved.append(directory)
            # 6 steps per epoch, saved every 2 steps and at each epoch's end: the 6th save is
            # at step 4 of epoch 2.
            if len(saved) == 6:
                raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(_model(tiny_text_backbone, **kw), data, data[:6], cfg, tmp_path / "cut")
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    stored = tmp_path / "cut" / "checkpoints" / "last" / "model" / "population.safetensors"
    assert stored.exists() == bool(warmup_epochs)
    resumed = _model(tiny_text_backbone, **kw)
    got = train(resumed, data, data[:6], cfg, tmp_path / "cut", resume=True)["summary"]
    assert got["strength_val"] == expected["strength_val"] and len(got["strength_val"]) == 5
    a, b = full.trainable_state_dict(), resumed.trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_checkpoint_is_an_error(tiny_text_backbone, tmp_path):
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(
            _model(tiny_text_backbone),
            opposite_tastes(4),
            None,
            TrainConfig(progress=False),
            tmp_path,
            resume=True,
        )


def test_warmup_copies_shared_row_to_every_user(tiny_text_backbone):
    model = _model(tiny_text_backbone, user_init="independent")
    table = model.user_parameters()[0]
    assert not torch.equal(table[0], table[1])
    first = table[0].clone()
    population.assign(model, population.from_row(model, 0))
    assert all(torch.equal(t[0], t[1]) for t in model.user_parameters())
    assert torch.equal(table[1], first)
    # After the personal stage users differ again.
    cfg = TrainConfig(
        epochs=2, warmup_epochs=1, lr=5e-3, batch_size=8, progress=False, max_length=32
    )
    model = _model(tiny_text_backbone)
    train(model, opposite_tastes(16), None, cfg)
    assert all(not torch.equal(t[0], t[1]) for t in model.user_parameters())


def test_nan_loss_stops_with_step(tiny_text_backbone, monkeypatch):
    monkeypatch.setattr(train_module, "bt_loss", lambda r: r * float("nan"))
    with pytest.raises(TrainingError, match="loss is nan at epoch 1 step 1"):
        train(
            _model(tiny_text_backbone),
            opposite_tastes(4),
            None,
            TrainConfig(progress=False, max_length=32),
        )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"lr": 0}, "lr must be a positive number"),
        ({"warmup_epochs": 3, "epochs": 3}, "warmup_epochs"),
        ({"schedule": "step"}, "schedule must be one of"),
    ],
)
def test_train_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("sparse_users", ["off", "on"])
def test_user_reg_pulls_users_toward_their_mean(tiny_text_backbone, sparse_users):
    def spread(model):
        return sum(float((t - t.mean(0)).pow(2).sum().detach()) for t in model.user_parameters())

    spreads = []
    for user_reg in (0.0, 10.0):
        model = _model(tiny_text_backbone, user_init="independent")
        cfg = _cfg(epochs=2, batch_size=8, user_reg=user_reg, sparse_users=sparse_users)
        train(model, opposite_tastes(16), None, cfg)
        spreads.append(spread(model))
    assert spreads[1] < 0.75 * spreads[0], spreads  # Adam moves each coordinate <= lr a step
    with pytest.raises(ValueError, match="user_reg must be >= 0"):
        TrainConfig(user_reg=-1.0)

"""prior="auto": one run per τ of the grid, each equal to a plain run, the best kept."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import opposite_tastes

from sharelora import AdapterConfig, PersonalizedRewardModel
from sharelora.config import PRIOR_GRID
from sharelora.evaluate import evaluate
from sharelora.fields import number_or_auto
from sharelora.recipe import TrainConfig, train

DATA, VAL = opposite_tastes(10), opposite_tastes(6, seed=1)


def _model(path, method="sharelora"):
    torch.manual_seed(0)
    return PersonalizedRewardModel.from_backbone(
        path, ["sunny", "rainy"], AdapterConfig(method=method, rank=4, top_layers=1)
    )


def _cfg(**kw) -> TrainConfig:
    # Deterministic kernels: a try and a plain run must agree bit for bit.
    base = {"epochs": 2, "batch_size": 4, "lr": 1e-2, "progress": False, "max_length": 32}
    return TrainConfig(**{**base, "deterministic": True, **kw})


def test_each_try_is_a_plain_run_and_the_lowest_loss_is_kept(tiny_text_backbone, tmp_path):
    plain = {}
    for tau in PRIOR_GRID:
        model = _model(tiny_text_backbone)
        run = train(model, DATA, VAL, _cfg(prior=tau), tmp_path / f"plain-{tau:g}")
        plain[tau] = run["val_metrics"]["calibrated_loss"], model.trainable_state_dict()
    stale = tmp_path / "auto" / "train_log.jsonl"  # an earlier plain run's log
    stale.parent.mkdir()
    stale.write_text("{}\n")
    model = _model(tiny_text_backbone)
    run = train(model, DATA, VAL, _cfg(prior="auto"), tmp_path / "auto")
    assert not stale.exists()

    search = run["summary"]["prior_search"]
    assert search == {f"{t:g}": plain[t][0] for t in PRIOR_GRID}
    chosen = min(PRIOR_GRID, key=lambda t: plain[t][0])
    assert run["summary"]["prior"] == chosen and run["summary"]["config"]["prior"] == "auto"
    for name, tensor in model.trainable_state_dict().items():
        assert torch.equal(tensor, plain[chosen][1][name]), name
    # The chosen model is written where a plain run writes it; the tries keep no optimizer state.
    written = json.loads((tmp_path / "auto" / "sharelora.json").read_text())
    assert written["training"]["prior_search"] == search
    loaded = PersonalizedRewardModel.from_pretrained(tmp_path / "auto")
    assert evaluate(loaded, VAL)["macro_accuracy"] == evaluate(model, VAL)["macro_accuracy"]
    for tau in PRIOR_GRID:
        assert (tmp_path / "auto" / f"prior-{tau:g}" / "train_log.jsonl").exists()
        assert not (tmp_path / "auto" / f"prior-{tau:g}" / "checkpoints").exists()


def test_shared_has_no_prior_to_choose(tiny_text_backbone, tmp_path):
    run = train(_model(tiny_text_backbone, "shared"), DATA, VAL, _cfg(prior="auto"), tmp_path)
    assert run["summary"]["prior"] == 0.0 and "prior_search" not in run["summary"]
    assert not list(tmp_path.glob("prior-*"))


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda m, out: train(m, DATA, VAL, _cfg(prior="auto"), out, resume=True), "afresh"),
        (lambda m, out: _cfg(prior="wide"), "'auto'"),
        (lambda m, out: _cfg(prior=-1.0), "prior must be a number >= 0"),
    ],
)
def test_errors_say_how_to_fix(tiny_text_backbone, tmp_path, call, message):
    with pytest.raises(ValueError, match=message):
        call(_model(tiny_text_backbone), tmp_path)


def test_auto_without_validation_is_the_default_and_says_so(tiny_text_backbone, tmp_path):
    with pytest.warns(
        UserWarning, match="no validation pairs: --prior auto trains at the default 1"
    ):
        run = train(_model(tiny_text_backbone), DATA, None, _cfg(prior="auto"), tmp_path)
    assert run["summary"]["prior"] == 1.0 and run["summary"]["strength"] == 1.0


def test_flag_reads_auto_or_a_number():
    assert number_or_auto("auto") == "auto" and number_or_auto("0.25") == 0.25

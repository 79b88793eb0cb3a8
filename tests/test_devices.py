"""State that crosses devices: the population and optimizer state must follow the parameters.

CPU-only machines have a second device to test with: ``meta``. A tensor op that mixes ``cpu``
and ``meta`` fails exactly as one that mixes ``cpu`` and ``cuda`` does, so these tests catch
the GPU bugs without a GPU. The CUDA-only test runs where there is one
(``benchmarks/gpu_smoke.sh`` runs the whole pipeline there).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import opposite_tastes, randomize

from sharelora import AdapterConfig, PersonalAdamW, PersonalizedRewardModel, population
from sharelora.optim import _bias_corrections
from sharelora.recipe import TrainConfig, train
from sharelora.strength import apply_strength, user_weights


def _model(path, method="sharelora"):
    torch.manual_seed(0)
    return PersonalizedRewardModel.from_backbone(
        path, ["sunny", "rainy"], AdapterConfig(method=method, rank=4), max_length=32
    )


def test_strength_uses_a_population_taken_on_another_device(tiny_text_backbone):
    # Training takes the population before accelerate moves the model to its device.
    model = _model(tiny_text_backbone)
    randomize(model)
    model.population = population.mean_of(model)  # on the CPU
    model.to("meta")
    counts = torch.tensor([3, 5])  # on the CPU too
    strength, _, _ = apply_strength(model, 0.5, None, lambda tag: None, counts)
    assert strength == 0.5
    personal = model.trainable_state_dict()
    population.lerp(model, model.population, personal, 0.5, user_weights(counts, 2.0))
    assert all(t.device.type == "meta" for t in model.trainable_state_dict().values())
    population.assign(model, model.population)  # and starting every user there


def _stepped_optimizer(device="cpu"):
    table = torch.nn.Parameter(torch.randn(4, 3, device=device))
    shared = torch.nn.Parameter(torch.randn(2, device=device))
    opt = PersonalAdamW(
        [{"params": [shared]}, {"params": [table], "lazy": True, "weight_decay": 0.0}], lr=0.1
    )
    rows = torch.tensor([[1, 3]])
    table.grad = torch.sparse_coo_tensor(rows, torch.ones(2, 3), (4, 3), check_invariants=True)
    shared.grad = torch.ones(2)
    opt.step()
    return opt, table, shared


def test_optimizer_state_loads_onto_the_parameters_device():
    opt, _, _ = _stepped_optimizer()
    state = opt.state_dict()
    table = torch.nn.Parameter(torch.empty(4, 3, device="meta"))
    shared = torch.nn.Parameter(torch.empty(2, device="meta"))
    again = PersonalAdamW(
        [{"params": [shared]}, {"params": [table], "lazy": True, "weight_decay": 0.0}], lr=0.1
    )
    again.load_state_dict(state)
    for p in (table, shared):
        for name, value in again.state[p].items():
            assert value.device.type == "meta", name  # torch alone leaves "step" on the CPU


def test_optimizer_state_has_no_float64():
    # Apple's MPS has no float64: every state tensor must live in the parameter's dtype or
    # as an integer count.
    opt, table, shared = _stepped_optimizer()
    for p in (table, shared):
        for value in opt.state[p].values():
            assert value.dtype != torch.float64
    assert opt.state[table]["step"].tolist() == [0, 1, 0, 1]
    # Loading a checkpoint with float64 counts (older versions) gives integers too.
    state = opt.state_dict()
    for slots in state["state"].values():
        slots["step"] = slots["step"].double()
    opt.load_state_dict(state)
    assert opt.state[table]["step"].dtype == torch.int64


def test_bias_corrections_in_float32_match_the_exact_values():
    steps = torch.tensor([1, 2, 10, 1000, 100_000])
    bc1, bc2_sqrt = _bias_corrections(steps, 0.9, 0.999, torch.zeros(5, 2))
    for t, a, b in zip(steps.tolist(), bc1.flatten(), bc2_sqrt.flatten(), strict=True):
        assert a.dtype == torch.float32
        assert float(a) == pytest.approx(1 - 0.9**t, rel=1e-6)
        assert float(b) == pytest.approx(math.sqrt(1 - 0.999**t), rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_personal_stage_from_a_shared_model_on_cuda(tiny_text_backbone, tmp_path):
    cfg = TrainConfig(epochs=1, lr=1e-2, batch_size=8, progress=False, max_length=32)
    train(_model(tiny_text_backbone, "shared"), opposite_tastes(8), None, cfg, tmp_path / "s")
    model = _model(tiny_text_backbone)
    cfg = TrainConfig(**{**cfg.__dict__, "init_from": str(tmp_path / "s"), "strength": "auto"})
    result = train(model, opposite_tastes(8), opposite_tastes(4, seed=1), cfg, tmp_path / "p")
    assert result["summary"]["strength"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    resumed = _model(tiny_text_backbone)
    train(resumed, opposite_tastes(8), opposite_tastes(4, seed=1), cfg, tmp_path / "p", True)


def test_host_tables_stay_in_host_memory_when_the_model_moves(tiny_text_backbone):
    model = _model(tiny_text_backbone)
    names = [n for n, _ in model.named_parameters()]
    model.keep_user_tables_on_host()
    model.to("meta")
    assert all(t.device.type == "cpu" for t in model.user_parameters())
    assert all(p.device.type == "meta" for p in model.shared_parameters())
    assert [n for n, _ in model.named_parameters()] == names  # order kept (optimizer, saves)


@pytest.mark.parametrize("sparse_users", ["on", "off"])
def test_host_tables_train_exactly_like_device_tables(tiny_text_backbone, sparse_users):
    """Training moves the model to the accelerator; host tables must stay in host memory and
    train as device tables do. With a GPU the two runs put the tables on different devices,
    so the rows cross to the GPU and their gradients come back (float rounding of the host's
    optimizer step apart, the same numbers). On a CPU-only machine both live in host memory:
    then the host path's own bookkeeping (tables kept out of ``.to``, rows gathered and sent
    back, their order among the parameters) must change no bit."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    weights, places = [], []
    for where in ("device", "host"):
        model = _model(tiny_text_backbone)
        cfg = TrainConfig(
            epochs=2, lr=1e-2, batch_size=4, progress=False, max_length=32, prior=1.0,
            sparse_users=sparse_users, user_tables=where, deterministic=True,
        )  # fmt: skip
        result = train(model, opposite_tastes(6), opposite_tastes(3, seed=1), cfg)
        assert result["summary"]["user_tables"] == where
        places.append({t.device.type for t in model.user_parameters()})
        assert {p.device.type for p in model.shared_parameters()} == {device}
        weights.append({k: v.cpu() for k, v in model.trainable_state_dict().items()})
    assert places == [{device}, {"cpu"}]
    for key in weights[0]:
        if device == "cpu":
            assert torch.equal(weights[0][key], weights[1][key]), key
        else:
            torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-4, atol=1e-6)

"""The population that keeps learning, the gate that serves it, and select-then-refit."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import opposite_tastes

import sharelora.train as train_module
from sharelora import AdapterConfig, PersonalizedRewardModel, population
from sharelora.config import METHODS, POPULATION_Z
from sharelora.data import Comparison, SplitConfig, split_per_user
from sharelora.evaluate import evaluate
from sharelora.recipe import TrainConfig, train
from sharelora.strength import apply_scale, population_gate
from sharelora.train import Trainer

PERSONAL = [m for m in METHODS if m != "shared"]
USERS = ["sunny", "rainy"]


def _model(path, method="sharelora"):
    torch.manual_seed(0)
    return PersonalizedRewardModel.from_backbone(
        path, USERS, AdapterConfig(method=method, rank=4), max_length=32
    )


def _cfg(**kw):
    return TrainConfig(
        **{"epochs": 2, "lr": 1e-2, "batch_size": 8, "progress": False, "max_length": 32, **kw}
    )


def _agreeing(n: int = 12):
    """Both users like 'yes': nothing to personalize, everything for the population to learn."""
    return [
        Comparison(f"question {i}?", f"yes {w}", f"no {w}", user)
        for i in range(n)
        for w in ("lamp", "tree")
        for user in USERS
    ]


@pytest.mark.parametrize("method", PERSONAL)
def test_strength_zero_serves_the_population_that_trained(tiny_text_backbone, tmp_path, method):
    start = _model(tiny_text_backbone, method)
    before = population.of(start)
    model = _model(tiny_text_backbone, method)
    train(model, opposite_tastes(12), None, _cfg(strength=0.0), tmp_path)
    assert model.users.names == USERS and model.router.num_users == len(USERS)
    learned = model.population
    tables = population.user_tables(model)
    # Every user is the population, and the population moved: it trained on every pair.
    for name, table in tables.items():
        assert table.shape[0] == len(USERS)
        torch.testing.assert_close(table, learned[name].expand_as(table), rtol=0, atol=0)
    assert any(not torch.equal(learned[n], before[n]) for n in tables)
    # The shared tensors as trained are the population's: serving it changes none of them.
    for name, tensor in model.trainable_state_dict().items():
        if name not in tables:
            torch.testing.assert_close(learned[name], tensor, rtol=0, atol=0)
    # Saved and reloaded, the same population scores an unknown user.
    loaded = PersonalizedRewardModel.from_pretrained(tmp_path)
    for name, row in loaded.population.items():
        torch.testing.assert_close(row, learned[name], rtol=0, atol=0)
    rows = opposite_tastes(3, seed=5)
    known = evaluate(loaded, rows)
    strangers = [replace(c, user=f"new-{c.user}") for c in rows]
    with pytest.raises(KeyError, match="--unknown-user population"):
        evaluate(loaded, strangers)
    unknown = evaluate(loaded, strangers, unknown_user="population")
    assert unknown["unknown_users"] == {"policy": "population", "users": 2, "rows": len(rows)}
    assert known["unknown_users"]["users"] == 0
    for user in USERS:
        got, want = unknown["users"][f"new-{user}"], known["users"][user]
        assert got["accuracy"] == want["accuracy"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_the_learned_population_learns_what_everyone_shares(tiny_text_backbone):
    """Where users agree the learned population fits them; the fixed start (LoRA B = 0 and an
    untrained head, plus whatever the shared head learned) is what κ = ∞ served before."""
    data = _agreeing()
    accuracy = {}
    for learns in (True, False):
        model = _model(tiny_text_backbone)
        cfg = _cfg(strength=0.0, epochs=3, train_population=learns, prior=0.0)
        train(model, data, None, cfg)
        accuracy[learns] = evaluate(model, _agreeing(4))
    assert accuracy[True]["macro_accuracy"] == 1.0
    assert accuracy[True]["loss"] < accuracy[False]["loss"]


def test_users_are_the_population_plus_a_deviation_while_it_learns(tiny_text_backbone):
    model = _model(tiny_text_backbone, "sharelora-head")
    start = {k: v.clone() for k, v in population.user_tables(model).items()}
    learner = population.add_learner(model, lr_scale=4.0)
    assert model.users.names[-1] == population.LEARNER and learner == 2
    tables = population.user_tables(model)
    for name, table in tables.items():  # every user starts at the population: Δ_u = 0
        torch.testing.assert_close(table[:2], torch.zeros_like(table[:2]), rtol=0, atol=0)
        torch.testing.assert_close(table[2] / 4, start[name][0], rtol=0, atol=0)
        torch.nn.init.normal_(table)
    layers = {n: (layer, t) for n, layer in model.adapter_layers.items()
              for t in layer.user_parameters}  # fmt: skip
    for name, table in tables.items():
        layer, t = layers[name.rsplit(".", 1)[0]]
        got = layer._rows(table, torch.tensor([0, 2, 1]))
        pop = table[2] / 4  # T̄: the row stores 4 T̄ (it steps at 4x the shared rate)
        torch.testing.assert_close(got, torch.stack([table[0] + pop, pop, table[1] + pop]))
    # T̄ learns from its own pairs alone: a user's row passes gradient to Δ_u, not to T̄.
    name, table = next(iter(tables.items()))
    layer, _ = layers[name.rsplit(".", 1)[0]]
    layer._rows(table, torch.tensor([0, 1])).sum().backward()
    assert table.grad[:2].abs().sum() > 0 and table.grad[2].abs().sum() == 0
    table.grad = None
    layer._rows(table, torch.tensor([2])).sum().backward()
    assert table.grad[:2].abs().sum() == 0 and table.grad[2].abs().sum() > 0
    table.grad = None
    # The prior's center is the population: |T_u − T̄|² is |Δ_u|², whatever T̄ is.
    center = population.learner_rows(model, learner)
    counts = torch.tensor([4, 2, 6])
    users = torch.tensor([0, 0, 1, 2])
    got = population.deviation_penalty(model, users, counts, center=center)
    want = torch.zeros(())
    for table in tables.values():
        for u, k in zip(*users.unique(return_counts=True), strict=True):
            sq = table[u].pow(2).sum() if u != learner else 0.0
            want = want + k / (len(users) * counts[u]) * sq
    torch.testing.assert_close(got, want / 2)
    deviations = {k: v.clone() for k, v in tables.items()}
    population.detach_learner(model, learner)
    assert model.users.names == USERS and all(t.shape[0] == 2 for t in model.user_parameters())
    for name, table in population.user_tables(model).items():
        pop = deviations[name][2] / 4
        torch.testing.assert_close(model.population[name][0], pop)
        torch.testing.assert_close(table, deviations[name][:2] + pop)
    with pytest.raises(ValueError, match="not the population learner"):
        population.detach_learner(model, 1)


def _tried(pop_losses, personal_losses):
    """Validation metrics per scale: per-user calibrated losses, 10 pairs each."""

    def metrics(losses):
        users = {f"u{i}": {"calibrated_loss": v, "n": 10} for i, v in enumerate(losses)}
        return {"calibrated_loss": sum(losses) / len(losses), "users": users}

    return {0.0: metrics(personal_losses), math.inf: metrics(pop_losses)}


@pytest.mark.parametrize(
    "pop,personal,served",
    [
        ([0.69] * 6, [0.40, 0.42, 0.38, 0.41, 0.39, 0.40], 0.0),  # every user gains: personal
        ([0.69] * 6, [0.40, 0.95, 0.45, 0.90, 0.50, 0.85], math.inf),  # a wash: population
        ([0.50] * 6, [0.55] * 6, math.inf),  # worse on validation: population
    ],
)
def test_the_gate_serves_the_population_unless_validation_shows_a_gain(pop, personal, served):
    chosen, gate = population_gate(_tried(pop, personal), 0.0)
    assert chosen == served
    assert gate["gain"] == pytest.approx(sum(pop) / 6 - sum(personal) / 6)
    assert population_gate(_tried(pop, personal), math.inf)[0] == math.inf


@pytest.mark.parametrize("ratio,served", [(0.9, math.inf), (1.1, 0.0)])
def test_the_gates_margin_is_population_z_standard_errors(ratio, served):
    # Six users, 10 pairs each, gains m ± 0.1: the user-clustered error is 0.1·√7.2 / 6.
    se = 0.1 * math.sqrt(7.2) / 6
    gain = ratio * POPULATION_Z * se
    personal = [0.69 - gain - 0.1 * (-1) ** i for i in range(6)]
    chosen, gate = population_gate(_tried([0.69] * 6, personal), 0.0)
    assert gate["se"] == pytest.approx(se) and gate["gain"] == pytest.approx(gain)
    assert chosen == served


def test_refit_repeats_validations_choices_on_every_pair(tiny_text_backbone, tmp_path):
    data = opposite_tastes(20)
    splits = split_per_user(data, SplitConfig(val=0.2, test=0.0, seed=0, val_by="row"))
    assert len(splits.refit) == len(data) and not set(map(id, splits.val)) - set(
        map(id, splits.refit)
    )
    cfg = _cfg(strength=1.0, epochs=3)
    model = _model(tiny_text_backbone)
    run = train(model, splits.train, splits.val, cfg, tmp_path / "a", refit_data=splits.refit)
    summary = run["summary"]
    chosen = summary["select"]["best_epochs"]
    assert 1 <= chosen <= 3 and summary["train_pairs"] == len(data)
    assert summary["validation"]["refit_pairs"] == len(data)
    seen = splits.manifest["validation_pairs_with_seen_texts"]
    assert summary["validation"]["seen_text_share"] == seen
    assert (tmp_path / "a" / "select" / "sharelora.json").exists()
    # The refit is a plain run on every pair at the chosen epochs, from the same start.
    plain = _model(tiny_text_backbone)
    train(plain, splits.refit, None, replace(cfg, epochs=chosen, select_best=False))
    want = plain.trainable_state_dict()
    for name, got in model.trainable_state_dict().items():
        torch.testing.assert_close(got, want[name], rtol=0, atol=0)
    saved = json.loads((tmp_path / "a" / "sharelora.json").read_text())["training"]
    assert saved["select"]["best_epochs"] == chosen and saved["config"]["refit"] is True


def test_a_refit_that_serves_the_start_takes_no_step(tiny_text_backbone, tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    train(_model(tiny_text_backbone, "shared"), opposite_tastes(12), None, _cfg(), shared)
    real = train_module.apply_strength

    def start_wins(model, strength, metrics, evaluate_val, counts, rule, start, median):
        real(model, strength, metrics, evaluate_val, counts, rule, start, median)
        apply_scale(model, None, counts, start)  # as if the gate found the start best
        return 0.0, metrics, {"start": metrics}

    monkeypatch.setattr(train_module, "apply_strength", start_wins)
    data = opposite_tastes(12)
    splits = split_per_user(data, SplitConfig(val=0.25, test=0.0, seed=0))
    model = _model(tiny_text_backbone)
    cfg = _cfg(init_from=str(shared))
    summary = train(model, splits.train, splits.val, cfg, tmp_path / "a", refit_data=splits.refit)
    summary = summary["summary"]
    assert summary["select"]["fallback"] == "start" and summary["fallback"] == "start"
    assert summary["steps"] == 0 and summary["served"] == "population"
    want = _model(tiny_text_backbone)
    population.assign(
        want, population.from_shared(want, PersonalizedRewardModel.from_pretrained(shared))
    )
    want = want.trainable_state_dict()
    for name, got in model.trainable_state_dict().items():
        torch.testing.assert_close(got, want[name], rtol=0, atol=0)


def test_a_text_carve_keeps_every_pair_for_the_refit():
    rows = [
        Comparison("q", f"t{a}", f"t{b}", f"u{u}")
        for u in range(3)
        for a in range(8)
        for b in range(a + 1, 8)
    ]
    splits = split_per_user(rows, SplitConfig(val=0.2, test=0.2, seed=1))
    assert splits.manifest["val_by"] == "text"  # no group or split column: new texts
    held = {t for c in splits.val for t in (c.chosen, c.rejected)}
    assert not held & {t for c in splits.train for t in (c.chosen, c.rejected)}
    test = {id(c) for c in splits.test}
    assert len(splits.refit) + len(splits.test) == len(rows)
    assert not test & {id(c) for c in splits.refit}
    capped = split_per_user(rows, SplitConfig(val=0.2, test=0.2, seed=1, max_per_user=5))
    per_user = {u: sum(c.user == u for c in capped.refit) for u in capped.users}
    assert set(per_user.values()) == {5}


def test_a_warmup_trains_the_population_and_leaves_every_deviation_at_zero(tiny_text_backbone):
    model = _model(tiny_text_backbone, "sharelora")
    cfg = _cfg(epochs=2, warmup_epochs=1)
    trainer = Trainer(model, opposite_tastes(8), opposite_tastes(4, seed=1), cfg)
    before = {k: v.clone() for k, v in population.user_tables(model).items()}
    trainer._begin_epoch(0)
    trainer.run_epoch(0)
    learner = trainer.learner
    for name, table in population.user_tables(model).items():
        assert table[:learner].abs().max() == 0  # Δ_u: no pair of theirs, no prior yet
        assert not torch.equal(table[learner], before[name][learner])
    # So validation in the warm-up, routed to user 0, scores the population: Δ_0 = 0.
    warm = trainer.evaluate("w", epoch=0)
    assert warm == trainer.evaluate("p", epoch=1)


def _metrics(loss: float, spread: float = 0.0) -> dict:
    users = {f"u{i}": {"calibrated_loss": loss + spread * (-1) ** i, "n": 10} for i in range(6)}
    return {"calibrated_loss": loss, "macro_accuracy": 1 - loss, "loss": loss, "users": users}


@pytest.mark.parametrize("start_loss,served", [(0.50, "start"), (0.70, "trained population")])
def test_the_better_fallback_of_the_start_and_the_trained_population_is_served(
    tiny_text_backbone, start_loss, served
):
    from sharelora.strength import apply_strength

    model = _model(tiny_text_backbone)
    start = {k: torch.randn_like(v) for k, v in population.of(model).items()}
    for table in model.user_parameters():
        torch.nn.init.normal_(table)
    model.population = {k: torch.randn_like(v) for k, v in population.of(model).items()}
    learned = model.population
    # Personal validation no better than a fallback beyond noise: the population is served.
    losses = {"shrinkage inf": 0.60, "start": start_loss}

    def evaluate_val(tag):  # per user the fallbacks gain where the personal model loses
        return _metrics(losses[tag], -0.2) if tag in losses else _metrics(0.59, 0.2)

    gamma, metrics, tried = apply_strength(
        model, "auto", _metrics(0.59, 0.2), evaluate_val, torch.tensor([5, 5]), start=start
    )
    gate = metrics["gate"]
    assert gamma == 0.0 and gate["personal_vs_fallback"]["gain"] == pytest.approx(
        min(start_loss, 0.6) - 0.59
    )
    assert gate["population_vs_start"]["gain"] == pytest.approx(start_loss - 0.6)
    assert gate["personal_vs_fallback"]["scale"] == "0" and gate["z"] == POPULATION_Z
    want = start if served == "start" else learned
    assert ("start" in tried) == (served == "start")
    tables = population.user_tables(model)
    for name, tensor in model.trainable_state_dict().items():
        if name in tables:
            torch.testing.assert_close(tensor, want[name].expand_as(tensor), rtol=0, atol=0)
        elif served == "start":  # the start is a whole model: its shared tensors too
            torch.testing.assert_close(tensor, start[name], rtol=0, atol=0)
    assert (model.population is start) == (served == "start")

"""Falling back toward the population: start from a shared model, personalization strength."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import opposite_tastes

from sharelora import AdapterConfig, PersonalizedRewardModel, population
from sharelora.compare import compare
from sharelora.config import FACTORINGS, METHODS, POPULATION_Z, SHRINKAGE
from sharelora.data import split_per_user
from sharelora.recipe import TrainConfig, train
from sharelora.strength import choose_scale, paired_se, user_weights

PERSONAL = [m for m in METHODS if m != "shared"]
USERS = ["sunny", "rainy"]


def _model(path, method="sharelora", rank=4, **kw):
    torch.manual_seed(0)
    return PersonalizedRewardModel.from_backbone(
        path, USERS, AdapterConfig(method=method, rank=rank, **kw), max_length=32
    )


def _cfg(**kw):
    return TrainConfig(
        **{"epochs": 2, "lr": 1e-2, "batch_size": 8, "progress": False, "max_length": 32, **kw}
    )


@pytest.fixture(scope="module")
def shared_dir(tiny_text_backbone, tmp_path_factory):
    """A trained shared model (non-zero B and head) on disk."""
    out = tmp_path_factory.mktemp("shared")
    train(_model(tiny_text_backbone, "shared"), opposite_tastes(12), None, _cfg(), out)
    return out


def _rewards(model, user_ids):
    batch = model.tokenizer(
        ["question 1? yes lamp book", "question 2? no tree river"],
        return_tensors="pt",
        padding=True,
    )
    model.eval()
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"], user_ids=user_ids)


@pytest.mark.parametrize("factoring", FACTORINGS)
@pytest.mark.parametrize("method", PERSONAL)
def test_start_from_scores_every_user_like_the_shared_model(
    tiny_text_backbone, shared_dir, method, factoring
):
    shared = PersonalizedRewardModel.from_pretrained(shared_dir)
    assert any(p.abs().sum() > 0 for n, p in shared.trainable_state_dict().items() if "B" in n)
    model = _model(tiny_text_backbone, method, user_init="independent")
    population.assign(model, population.from_shared(model, shared, factoring))
    expected = _rewards(shared, torch.tensor([0, 0]))
    for user in (0, 1):
        got = _rewards(model, torch.tensor([user, user]))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("out_f,in_f,r", [(12, 20, 4), (8, 40, 8), (64, 16, 2)])
def test_orthonormal_b_keeps_the_product_and_prices_every_direction_alike(out_f, in_f, r):
    gen = torch.Generator().manual_seed(0)
    # As training leaves them: one large direction, the rest near zero.
    b = torch.randn(out_f, r, generator=gen) * torch.logspace(0, -2, r)
    a = torch.randn(r, in_f, generator=gen)
    a2, b2 = population.orthonormal_b(a, b)
    assert a2.shape == a.shape and b2.shape == b.shape and a2.dtype == a.dtype
    torch.testing.assert_close(b2 @ a2, b @ a, rtol=0, atol=1e-5)
    torch.testing.assert_close(b2.T @ b2, torch.eye(r), rtol=0, atol=1e-5)
    delta = torch.randn(r, in_f, generator=gen)  # a user's ΔA: its weight change is B ΔA
    torch.testing.assert_close((b2 @ delta).norm(), delta.norm(), rtol=1e-5, atol=0)
    zero_a, zero_b = population.orthonormal_b(a, torch.zeros(out_f, r))  # an untrained B
    assert torch.isfinite(zero_a).all() and (zero_b @ zero_a).abs().max() == 0
    wide_a, narrow_b = torch.randn(5, in_f, generator=gen), torch.randn(2, 5, generator=gen)
    kept = population.orthonormal_b(wide_a, narrow_b)  # rank 5 > out 2: no 5 such columns
    assert kept[0] is wide_a and kept[1] is narrow_b


@pytest.mark.parametrize("method", PERSONAL)
def test_start_factoring_changes_only_the_factors_users_own_a_through(
    tiny_text_backbone, shared_dir, method
):
    shared = PersonalizedRewardModel.from_pretrained(shared_dir)
    model = _model(tiny_text_backbone, method)
    trained = population.from_shared(model, shared)  # the default
    orth = population.from_shared(model, shared, "orthonormal")
    source = shared.trainable_state_dict()
    for name, t in trained.items():  # as-trained: the shared model's factors, bit for bit
        shared_name = name.replace(".user_", ".lora_")
        if shared_name in source and "_W" not in name:
            torch.testing.assert_close(t.reshape(source[shared_name].shape), source[shared_name],
                                       rtol=0, atol=0)  # fmt: skip
    moved = {name for name in orth if not torch.equal(orth[name], trained[name])}
    owns_a = model.adapter_config.method in ("independent", "sharelora", "sharelora-head")
    assert bool(moved) == owns_a
    assert all(name.endswith(("_A", "_B")) for name in moved)
    with pytest.raises(ValueError, match="factoring must be one of .*as-trained.*orthonormal"):
        population.from_shared(model, shared, "balanced")


def test_start_from_needs_a_matching_shared_model(tiny_text_backbone, shared_dir):
    with pytest.raises(ValueError, match="from a model trained with method 'shared'"):
        population.from_shared(_model(tiny_text_backbone), _model(tiny_text_backbone, "diag"))
    shared = PersonalizedRewardModel.from_pretrained(shared_dir)
    with pytest.raises(ValueError, match="does not match this one at .*lora_A"):
        population.from_shared(_model(tiny_text_backbone, rank=2), shared)


@pytest.mark.parametrize("method", ["sharelora", "core"])
def test_strength_interpolates_between_population_and_personal(
    tiny_text_backbone, shared_dir, method
):
    data = opposite_tastes(12)
    models = {}
    for strength in (0.0, 0.5, 1.0):
        models[strength] = _model(tiny_text_backbone, method)
        cfg = _cfg(init_from=str(shared_dir), strength=strength, train_population=False)
        train(models[strength], data, None, cfg)
    start = _model(tiny_text_backbone, method)
    shared = PersonalizedRewardModel.from_pretrained(shared_dir)
    population.assign(start, population.from_shared(start, shared))
    pop, half, full = (m.trainable_state_dict() for m in (start, models[0.5], models[1.0]))
    zero = models[0.0].trainable_state_dict()
    for name in pop:
        torch.testing.assert_close(zero[name], pop[name], rtol=0, atol=0)
        torch.testing.assert_close(half[name], torch.lerp(pop[name], full[name], 0.5))


@pytest.mark.parametrize("method", ["sharelora", "diag", "head"])
def test_freeze_shared_trains_only_the_user_tables(tiny_text_backbone, shared_dir, method):
    model = _model(tiny_text_backbone, method)
    cfg = _cfg(init_from=str(shared_dir), strength=1.0, freeze_shared=True)
    train(model, opposite_tastes(12), None, cfg)
    start = _model(tiny_text_backbone, method)
    population.assign(
        start, population.from_shared(start, PersonalizedRewardModel.from_pretrained(shared_dir))
    )
    before, after = start.trainable_state_dict(), model.trainable_state_dict()
    tables = population.user_tables(model)
    for name in after:
        if name in tables:
            assert not torch.equal(after[name], before[name]), name
        else:  # the shared factors and the head: never stepped
            torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)


def test_freeze_shared_needs_a_shared_start(tiny_text_backbone):
    model = _model(tiny_text_backbone)
    with pytest.raises(ValueError, match="freeze_shared keeps the shared tensors.*--init-from"):
        train(model, opposite_tastes(4), None, _cfg(freeze_shared=True))


def test_strength_zero_without_a_start_gives_every_user_the_mean_rows(tiny_text_backbone):
    personal = _model(tiny_text_backbone, user_init="independent")
    fixed = {"prior": 0.0, "train_population": False}
    train(personal, opposite_tastes(12), None, _cfg(strength=1.0, **fixed))
    shrunk = _model(tiny_text_backbone, user_init="independent")
    train(shrunk, opposite_tastes(12), None, _cfg(strength=0.0, **fixed))
    for full, zero in zip(personal.user_parameters(), shrunk.user_parameters(), strict=True):
        torch.testing.assert_close(zero, full.mean(0, keepdim=True).expand_as(full))


def test_with_a_prior_strength_zero_gives_every_user_the_prior_center(tiny_text_backbone):
    # With the population fixed and no shared start the prior's center is where every user
    # started: at strength 0 every user is back there (the mean of the independent draws).
    start = _model(tiny_text_backbone, user_init="independent")
    center = population.mean_of(start)
    model = _model(tiny_text_backbone, user_init="independent")
    train(model, opposite_tastes(12), None, _cfg(strength=0.0, train_population=False))
    for name, table in population.user_tables(model).items():
        torch.testing.assert_close(table, center[name].expand_as(table), rtol=0, atol=0)


def test_shrinkage_keeps_n_over_n_plus_kappa_of_each_users_deviation(tiny_text_backbone):
    model = _model(tiny_text_backbone, "diag")
    base = population.mean_of(model)
    for table in model.user_parameters():
        torch.nn.init.normal_(table)
    personal = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    counts = torch.tensor([5, 495])
    weights = user_weights(counts, 5.0)
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.99]))
    population.lerp(model, base, personal, 0.7, weights)
    for name, table in population.user_tables(model).items():
        for user, keep in enumerate(weights.tolist()):
            expected = base[name][0] + keep * (personal[name][user] - base[name][0])
            torch.testing.assert_close(table[user], expected)
    assert user_weights(counts, float("inf")).eq(0).all()


@pytest.mark.parametrize("rule", ["lowest", "one-se"])
def test_auto_strength_is_chosen_on_validation_loss(tiny_text_backbone, tmp_path, rule):
    data, val = opposite_tastes(16), opposite_tastes(8, seed=1)
    model = _model(tiny_text_backbone)
    # No prior in training: on this tiny random backbone it would hold both users at the
    # population, and this test is about the choice after training.
    cfg = _cfg(epochs=4, prior=0.0, strength_rule=rule)
    result = train(model, data, val, cfg, tmp_path)
    tried = result["summary"]["shrinkage_val"]
    assert [float(s) for s in tried] == pytest.approx(list(SHRINKAGE), rel=1e-5)
    low = min(m["calibrated_loss"] for m in tried.values())
    if rule == "lowest":
        chosen = min(float(s) for s, m in tried.items() if m["calibrated_loss"] == low)
    else:  # the strongest shrinkage within one paired error of the lowest loss
        chosen = max(float(s) for s, m in tried.items() if m["calibrated_loss"] - low <= m["se"])
    assert result["summary"]["strength"] == pytest.approx(1 / (1 + chosen), rel=1e-5)
    # The summary keeps the gate's evidence, and it agrees with what is served.
    gate = result["summary"]["gate"]["personal_vs_fallback"]
    assert gate["scale"] == f"{chosen:g}" and gate["gain"] > POPULATION_Z * gate["se"]
    # These users disagree: the population (infinite shrinkage) cannot serve both.
    assert result["summary"]["strength"] >= 0.5
    assert tried["inf"]["macro_accuracy"] < tried["0"]["macro_accuracy"]
    saved = json.loads((tmp_path / "sharelora.json").read_text())["training"]
    assert saved["strength"] == result["summary"]["strength"]
    # The saved model is the chosen one.
    again = PersonalizedRewardModel.from_pretrained(tmp_path)
    a, b = model.trainable_state_dict(), again.trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("strength", [-0.1, 1.5, "high", True])
def test_strength_validation(strength):
    with pytest.raises(ValueError, match="strength must be 'auto' or a number in"):
        TrainConfig(strength=strength)
    with pytest.raises(ValueError, match="strength_rule must be one of .*lowest.*one-se"):
        TrainConfig(strength_rule="median")
    with pytest.raises(ValueError, match="init_factoring must be one of .*as-trained"):
        TrainConfig(init_factoring="balanced")


def test_compare_from_shared_at_strength_zero_equals_shared(tiny_text_backbone, tmp_path):
    from sharelora.data import SplitConfig

    splits = split_per_user(opposite_tastes(20), SplitConfig(val=0.2, test=0.2, seed=0))
    adapter = AdapterConfig(rank=4)
    results, _ = compare(
        splits,
        ["sharelora", "core", "shared"],
        adapter,
        _cfg(strength=0.0, train_population=False),
        str(tiny_text_backbone),
        tmp_path,
        log=lambda m: None,
        from_shared=True,
    )
    for method in ("sharelora", "core"):
        # Per-user bmm against the shared matmul: equal to float rounding, not bit for bit.
        users = results["shared"]["users"]
        assert results[method]["users"].keys() == users.keys()
        for user, expected in users.items():
            assert results[method]["users"][user] == pytest.approx(expected, rel=1e-5)
        assert results[method]["strength"] == 0.0
    # Each choosing run (the control's too) starts from the shared model's own, which never
    # saw a validation pair; each refit from the shared model refitted on them.
    for method in ("sharelora", "core", "shared+from-shared"):
        chooser = json.loads((tmp_path / method / "select" / "sharelora.json").read_text())
        assert chooser["training"]["config"]["init_from"] == str(tmp_path / "shared" / "select")
        refit = json.loads((tmp_path / method / "sharelora.json").read_text())
        assert refit["training"]["config"]["init_from"] == str(tmp_path / "shared")
    with pytest.raises(ValueError, match="needs 'shared' among the methods"):
        compare(
            splits,
            ["sharelora"],
            adapter,
            _cfg(),
            str(tiny_text_backbone),
            tmp_path / "x",
            log=lambda m: None,
            from_shared=True,
        )


def test_compare_freeze_shared_keeps_the_shared_tensors_of_its_shared_model(
    tiny_text_backbone, tmp_path
):
    from sharelora.data import SplitConfig

    splits = split_per_user(opposite_tastes(20), SplitConfig(val=0.2, test=0.2, seed=0))
    methods = ["shared", "diag", "sharelora+frozen"]
    compare(splits, methods, AdapterConfig(rank=4), _cfg(), str(tiny_text_backbone), tmp_path,
            log=lambda m: None, from_shared=True, freeze_shared=True)  # fmt: skip
    shared_model = PersonalizedRewardModel.from_pretrained(tmp_path / "shared")
    shared = shared_model.trainable_state_dict()
    for method in methods[1:]:
        model = PersonalizedRewardModel.from_pretrained(tmp_path / method)
        tables, state = population.user_tables(model), model.trainable_state_dict()
        kept = [name for name in state if name not in tables]
        assert kept and any(name in tables for name in state)
        start = population.from_shared(model, shared_model)
        for name in kept:
            torch.testing.assert_close(state[name], start[name], rtol=0, atol=0)
    control = PersonalizedRewardModel.from_pretrained(tmp_path / "shared+from-shared")
    assert any(  # the compute control is never frozen
        not torch.equal(v, shared[k]) for k, v in control.trainable_state_dict().items()
    )


def test_select_best_off_uses_validation_only_for_strength(tiny_text_backbone, tmp_path):
    cfg = _cfg(select_best=False)
    result = train(
        _model(tiny_text_backbone), opposite_tastes(8), opposite_tastes(4), cfg, tmp_path
    )
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    evals = [e["at"] for e in log if e["event"] == "eval"]
    assert evals == ["final"] + [f"shrinkage {s:g}" for s in SHRINKAGE[1:]]
    assert result["summary"]["best_val_macro_accuracy"] is None


def test_calibrated_loss_is_the_loss_of_the_ranking_at_its_best_scale():
    from sharelora.evaluate import calibrated_loss

    m = torch.tensor([2.0, 1.5, -0.5, 3.0, -1.0, 0.7])
    raw = torch.nn.functional.softplus(-m).mean().item()
    best = calibrated_loss(m)
    assert best <= raw
    # The scale is profiled out: over- or under-confident copies have the same value ...
    assert calibrated_loss(5 * m) == pytest.approx(best, rel=1e-6)
    assert calibrated_loss(0.2 * m) == pytest.approx(best, rel=1e-6)
    # ... and it is the minimum over scales.
    grid = [torch.nn.functional.softplus(-s * m).mean().item() for s in torch.linspace(0, 5, 501)]
    assert best == pytest.approx(min(grid), abs=1e-4)
    assert calibrated_loss(torch.tensor([1.0, 2.0])) < 1e-3  # no error: scale grows to the cap


def _users(losses: dict[str, tuple[float, int]]) -> dict:
    """Metrics with per-user tables only."""
    return {"users": {u: {"calibrated_loss": loss, "n": n} for u, (loss, n) in losses.items()}}


def _pairs(users: list[str], texts: list[tuple[str, str]], losses: torch.Tensor) -> dict:
    """Metrics that keep every pair (``summarize(..., texts=...)``), with per-user tables."""
    table = {}
    for u, loss in zip(users, losses.tolist(), strict=True):
        table.setdefault(u, []).append(loss)
    return {
        "users": {u: {"calibrated_loss": sum(v) / len(v), "n": len(v)} for u, v in table.items()},
        "pairs": {"users": users, "texts": texts, "calibrated_loss": losses.tolist()},
    }


@pytest.mark.parametrize("texts_shared", [True, False])
def test_paired_se_clusters_pairs_by_user_and_by_text(texts_shared):
    gen = torch.Generator().manual_seed(0)
    users = [f"u{i % 5}" for i in range(60)]
    combos = [(a, b) for a in range(8) for b in range(a + 1, 8)]  # 28 pairs of 8 texts
    picks = torch.randint(0, len(combos), (60,), generator=gen).tolist()
    if texts_shared:
        texts = [(f"t{combos[k][0]}", f"t{combos[k][1]}") for k in picks]
    else:  # every pair its own two texts
        texts = [(f"a{i}", f"b{i}") for i in range(60)]
    # Text effects every user shares make pairs over a text move together.
    effect = torch.randn(8, generator=gen, dtype=torch.float64)
    shift = torch.tensor([effect[combos[k][0]] - effect[combos[k][1]] for k in picks])
    la = torch.rand(60, generator=gen, dtype=torch.float64) + (shift if texts_shared else 0)
    lb = torch.rand(60, generator=gen, dtype=torch.float64)
    a, b = _pairs(users, texts, la), _pairs(users, texts, lb)
    # Dense reference: Σ e_i e_j over every two pairs that share a user or a text.
    e = (la - lb) - (la - lb).mean()
    dep = torch.tensor(
        [
            [u == v or bool(set(s) & set(t)) for v, t in zip(users, texts, strict=True)]
            for u, s in zip(users, texts, strict=True)
        ],
        dtype=torch.float64,
    )
    by_user = torch.tensor([[u == v for v in users] for u in users], dtype=torch.float64)
    variance = max(e @ dep @ e, e @ by_user @ e)
    expected = (variance * 5 / 4).sqrt() / 60
    assert paired_se(a, b) == pytest.approx(expected.item(), rel=1e-9)
    tables = paired_se({"users": a["users"]}, {"users": b["users"]})  # by user alone
    if texts_shared:  # the shared texts widen the error
        assert paired_se(a, b) > 1.2 * tables
    else:  # no two pairs share a text: the error clustered by user alone
        assert paired_se(a, b) == pytest.approx(tables, rel=1e-9)


def test_paired_se_clusters_the_difference_by_user():
    a = _users({"x": (0.5, 2), "y": (0.7, 4), "z": (0.4, 1)})
    b = _users({"x": (0.6, 2), "y": (0.6, 4), "z": (0.6, 1)})
    # Summed differences per user: -0.2, +0.4, -0.2 over 7 pairs; mean 0/7 = 0.
    d, n = torch.tensor([-0.2, 0.4, -0.2]), torch.tensor([2.0, 4.0, 1.0])
    mean = d.sum() / n.sum()
    expected = (((d - n * mean) ** 2).sum() * 3 / 2).sqrt() / n.sum()
    assert paired_se(a, b) == pytest.approx(expected.item(), rel=1e-6)
    assert paired_se(a, a) == 0.0
    assert paired_se(_users({"x": (0.5, 3)}), _users({"x": (0.9, 3)})) == 0.0  # one user


def _tried(metrics_by_scale: dict[float, dict]) -> dict:
    out = {}
    for scale, metrics in metrics_by_scale.items():
        users = metrics["users"]
        pairs = sum(v["n"] for v in users.values())
        mean = sum(v["calibrated_loss"] * v["n"] for v in users.values()) / pairs
        out[scale] = {"calibrated_loss": mean, "users": users}
    return out


@pytest.mark.parametrize(
    "personal, expected",
    [
        # Every user is clearly better personal: the lowest loss is kept.
        ({"x": (0.40, 10), "y": (0.42, 10), "z": (0.41, 10)}, 0.0),
        # Lower on average, but one lucky user carries it: within the error, the population.
        ({"x": (0.20, 10), "y": (0.70, 10), "z": (0.68, 10)}, float("inf")),
    ],
)
def test_one_standard_error_keeps_the_population_unless_the_gain_is_clear(personal, expected):
    population = _users({"x": (0.60, 10), "y": (0.60, 10), "z": (0.60, 10)})
    tried = _tried({0.0: _users(personal), float("inf"): population})
    chosen, se = choose_scale(tried, "one-se")
    assert chosen == expected
    assert se[0.0] == 0.0  # the lowest loss against itself
    assert tried[0.0]["calibrated_loss"] < tried[float("inf")]["calibrated_loss"]

"""Training: it learns, resumes exactly, warms up as the reference recipe, stops on NaN."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import opposite_tastes, randomize, save_text_backbone

from sharelora import AdapterConfig, PersonalizedRewardModel, population
from sharelora import train as train_module
from sharelora.data import Comparison, PairDataset, PairTokenizer
from sharelora.evaluate import evaluate
from sharelora.recipe import TrainConfig, train
from sharelora.train import TrainingError


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
    # The cut falls in the personal stage: the prior and the strength chosen at the end need
    # the population in the checkpoint (a row of the tables, as it trains).
    data = opposite_tastes(12)
    # Exact resume is as exact as the run itself: bit-identical runs need deterministic kernels.
    cfg = _cfg(
        epochs=3, batch_size=4, eval_every=2, warmup_epochs=warmup_epochs, deterministic=True
    )
    kw = {"dropout": 0.1, "top_layers": top_layers}  # dropout: RNG state must be restored too
    full = _model(tiny_text_backbone, **kw)
    expected = train(full, data, data[:6], cfg, tmp_path / "full")["summary"]

    saved = []
    real_save = train_module.save_checkpoint

    def save_then_crash(directory, *args):
        real_save(directory, *args)
        if directory.name == "last":
            saved.append(directory)
            # 12 steps per epoch (the users' 24 pairs and the population's 24, 4 a batch),
            # saved every 2 steps and at each epoch's end: the 9th save is at step 4 of
            # epoch 2.
            if len(saved) == 9:
                raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(_model(tiny_text_backbone, **kw), data, data[:6], cfg, tmp_path / "cut")
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    stored = tmp_path / "cut" / "checkpoints" / "last" / "model" / "population.safetensors"
    # The population trains as a row of the tables: the checkpoint holds it there.
    assert not stored.exists() and cfg.train_population
    resumed = _model(tiny_text_backbone, **kw)
    got = train(resumed, data, data[:6], cfg, tmp_path / "cut", resume=True)["summary"]
    assert got["shrinkage_val"] == expected["shrinkage_val"] and len(got["shrinkage_val"]) == 5
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
        ({"lr": True}, "lr must be a positive number"),
        ({"user_lr_scale": 0}, "user_lr_scale must be a positive number"),
        ({"warmup_epochs": 3, "epochs": 3}, "warmup_epochs"),
        ({"schedule": "step"}, "schedule must be one of"),
        ({"prior_on": "rows"}, "prior_on must be one of"),
    ],
)
def test_train_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_deviation_penalty_is_the_prior_on_each_users_summed_loss(tiny_text_backbone):
    model = _model(tiny_text_backbone, "core")
    model.population = population.mean_of(model)
    randomize(model)
    counts = torch.tensor([4, 10])
    pair_users = torch.tensor([0, 1, 1])  # a batch of 3 pairs
    got = population.deviation_penalty(model, pair_users, counts)
    # Per pair i: |Δ_u|² / (2 n_u), averaged over the batch, over every per-user table.
    expected = 0.0
    for name, table in population.user_tables(model).items():
        center = model.population[name][0]
        for u in pair_users.tolist():
            expected += (table[u] - center).pow(2).sum().item() / (2 * counts[u].item()) / 3
    assert got.item() == pytest.approx(expected, rel=1e-5)


def _dense_weight_change(layer, user: int, center: dict) -> float:
    """``|ΔW_u − ΔW̄|²`` from dense ``[out, in]`` deltas: row ``u`` set to the population's
    rows gives ``ΔW̄`` (the shared factors as they are)."""
    with torch.no_grad():
        tables = layer.user_parameters
        saved = {n: t[user].clone() for n, t in tables.items()}
        personal = layer.delta_weight(user)
        for n, t in tables.items():
            t[user] = center[n][0]
        mean = layer.delta_weight(user)
        for n, t in tables.items():
            t[user] = saved[n]
    return (personal - mean).pow(2).sum().item()


@pytest.mark.parametrize("method", ["sharelora", "independent", "sharelora-b", "core", "diag"])
def test_weight_prior_is_the_dense_weight_change(tiny_text_backbone, method):
    model = _model(tiny_text_backbone, method)
    randomize(model, seed=1)
    model.population = population.from_row(model, 0)
    randomize(model, seed=2)
    counts = torch.tensor([4, 10])
    pair_users = torch.tensor([0, 1, 1])
    got = population.deviation_penalty(model, pair_users, counts, on="weights")
    expected = 0.0
    for name, layer in model.adapter_layers.items():
        center = {p: model.population[f"{name}.{p}"] for p in layer.user_parameters}
        for u in pair_users.tolist():
            expected += _dense_weight_change(layer, u, center) / (2 * counts[u].item()) / 3
    assert got.item() == pytest.approx(expected, rel=1e-4)
    # The shared factors are held fixed in it: the prior never shrinks what users share.
    model.zero_grad()
    got.backward()
    assert all(p.grad is None for p in model.shared_parameters())
    assert all(t.grad.abs().sum() > 0 for t in model.user_parameters())


def test_weight_prior_is_neutral_between_factorings(tiny_text_backbone):
    # One weight change s·B M Ā, made by sharelora through A_u = Ā + M Ā and by independent
    # through B_u = B + B M: the factor prior charges |M Ā|² and |B M|², the weight prior the
    # same for both.
    models = {m: _model(tiny_text_backbone, m) for m in ("sharelora", "independent")}
    randomize(models["sharelora"])
    g = torch.Generator().manual_seed(3)
    for m in models.values():
        m.population = {}
    for name, layer in models["sharelora"].adapter_layers.items():
        other = models["independent"].adapter_layers[name]
        a0, b = layer.user_A[0].detach(), layer.lora_B.detach()  # [r, in], [out, r]
        mix = torch.randn(layer.rank, layer.rank, generator=g)  # M [r, r]
        with torch.no_grad():
            layer.user_A[1] = a0 + mix @ a0
            other.user_A.copy_(a0.expand_as(other.user_A))
            other.user_B[0], other.user_B[1] = b, b + b @ mix
        models["sharelora"].population[f"{name}.user_A"] = a0[None].clone()
        models["independent"].population[f"{name}.user_A"] = a0[None].clone()
        models["independent"].population[f"{name}.user_B"] = b[None].clone()
    users, counts = torch.tensor([1]), torch.tensor([1, 1])
    penalty = {
        (m, on): population.deviation_penalty(models[m], users, counts, on).item()
        for m in models
        for on in ("factors", "weights")
    }
    assert penalty["sharelora", "weights"] == pytest.approx(penalty["independent", "weights"])
    assert penalty["sharelora", "weights"] > 0
    assert penalty["sharelora", "factors"] != pytest.approx(penalty["independent", "factors"])


@pytest.mark.parametrize("sparse_users", ["off", "on"])
def test_prior_holds_users_near_the_population(tiny_text_backbone, sparse_users):
    def deviation(model):
        return [
            sum((t[u] - model.population[n][0]).pow(2).sum().item() for n, t in
                population.user_tables(model).items())
            for u in range(2)
        ]  # fmt: skip

    data = opposite_tastes(16)
    # "sunny" keeps 2 comparisons, "rainy" all 16: one prior, two counts (the weights per
    # count are checked exactly above).
    data = [c for c in data if c.user == "rainy"] + [c for c in data if c.user == "sunny"][:2]
    runs = {}
    for prior in (0.0, 30.0):
        model = _model(tiny_text_backbone)
        model.population = population.mean_of(model)  # the same center for both runs
        cfg = _cfg(epochs=3, batch_size=4, prior=prior, sparse_users=sparse_users)
        summary = train(model, data, None, cfg)["summary"]
        assert summary["prior"] == prior
        runs[prior] = deviation(model)
    (few_free, many_free), (few, many) = runs[0.0], runs[30.0]
    assert few < 0.5 * few_free and many < 0.5 * many_free, runs
    with pytest.raises(ValueError, match="prior must be a number >= 0"):
        TrainConfig(prior=-1.0)


def _same_weights(a, b) -> bool:
    x, y = a.trainable_state_dict(), b.trainable_state_dict()
    return all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("select_best", [True, False])
def test_a_fresh_run_never_reads_the_previous_runs_state(tiny_text_backbone, tmp_path, select_best):
    data, val = opposite_tastes(12), opposite_tastes(4, seed=1)
    # The first run leaves a best checkpoint of a different model (another rank's tensors
    # would not even load) in the directory.
    first = _model(tiny_text_backbone)
    train(first, data, val, _cfg(epochs=2, batch_size=4, lr=2e-2), tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "best").exists()
    cfg = _cfg(epochs=1, batch_size=4, select_best=select_best, seed=3)
    again, fresh = _model(tiny_text_backbone), _model(tiny_text_backbone)
    train(again, data, None if select_best else val, cfg, tmp_path / "run")
    train(fresh, data, None if select_best else val, cfg, tmp_path / "fresh")
    assert _same_weights(again, fresh)
    saved = PersonalizedRewardModel.from_pretrained(tmp_path / "run")
    assert _same_weights(saved, fresh)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").open()]
    steps = [r["global_step"] for r in log if r["event"] == "step"]
    # This run's steps, nothing older: 24 pairs of the users' and 24 of the population's.
    assert steps == list(range(1, 13))


def test_warmup_validates_as_it_trains_and_selection_restarts(tiny_text_backbone):
    # The warm-up of user 0's row (with the population learning, it trains the population's
    # row instead: tests/test_population.py).
    model = _model(tiny_text_backbone, user_init="independent")
    cfg = _cfg(epochs=2, warmup_epochs=1, batch_size=8, train_population=False)
    trainer = train_module.Trainer(model, opposite_tastes(8), opposite_tastes(6, seed=1), cfg)
    randomize(model)  # users differ
    warm, personal = trainer.evaluate("w", epoch=0), trainer.evaluate("p", epoch=1)
    population.assign(model, population.from_row(model, 0))
    routed = trainer.evaluate("p", epoch=1)
    # Warm-up rows are all one user's, so they take the one-user matmul; the routed pass gathers
    # each row's factors: the same sum in another order, equal to float32 rounding.
    assert warm["loss"] == pytest.approx(routed["loss"], rel=1e-6, abs=1e-7)
    assert abs(warm["loss"] - personal["loss"]) > 1e-4
    trainer.progress.best = 0.9  # a warm-up checkpoint is not a personal model
    trainer._begin_epoch(1)
    assert trainer.progress.best is None and model.population is not None


def test_every_checkpoint_write_is_followed_by_a_barrier(tiny_text_backbone, tmp_path, monkeypatch):
    events = []
    real_save = train_module.save_checkpoint
    monkeypatch.setattr(
        train_module,
        "save_checkpoint",
        lambda d, *a: (events.append(f"save {d.name}"), real_save(d, *a)),
    )
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "wait_for_everyone", lambda self: events.append("barrier"))
    cfg = _cfg(epochs=2, batch_size=8)
    train(_model(tiny_text_backbone), opposite_tastes(8), opposite_tastes(4, seed=1), cfg, tmp_path)
    saves = [i for i, e in enumerate(events) if e.startswith("save")]
    # After each run of saves (best, then last) the next event is a barrier.
    for i in saves:
        after = next(e for e in events[i:] if not e.startswith("save"))
        assert after == "barrier", events
    assert "save best" in events  # and best is only read after one


def test_training_log_counts_a_tie_as_half(tmp_path):
    # chosen == rejected and no dropout: every margin is exactly 0, which metrics.json counts
    # as half right.
    backbone = save_text_backbone(
        tmp_path / "bb", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    ties = [Comparison("q?", "same reply", "same reply", u) for u in ("sunny", "rainy") * 4]
    train(_model(backbone), ties, None, _cfg(epochs=1, batch_size=8), tmp_path / "run")
    steps = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").open()]
    assert [s["accuracy"] for s in steps if s["event"] == "step"] == [0.5, 0.5]  # + population


def test_deterministic_runs_are_bit_identical_and_restore_the_global_flag(tiny_text_backbone):
    models = []
    for _ in range(2):
        models.append(_model(tiny_text_backbone, dropout=0.1))
        cfg = _cfg(epochs=2, batch_size=4, deterministic=True, sparse_users="on")
        result = train(models[-1], opposite_tastes(8), None, cfg)
        assert result["summary"]["deterministic"] is True
    assert _same_weights(*models)
    assert not torch.are_deterministic_algorithms_enabled()


def test_prefix_cache_pads_right_and_says_it_runs_without_dropout(tiny_text_backbone):
    model = _model(tiny_text_backbone, top_layers=1)
    model.tokenizer.padding_side = "left"  # a decoder tokenizer's usual setting
    result = train(model, opposite_tastes(6), None, _cfg(epochs=1, batch_size=6))
    assert "no dropout" in result["summary"]["prefix_cache"]
    ds = PairDataset(opposite_tastes(3), model.users, PairTokenizer(model.tokenizer, 32))
    mask = ds.collate([ds[i] for i in range(len(ds))])["attention_mask"]
    assert bool((mask[:, 0] == 1).all())  # every row starts with real tokens


@pytest.mark.parametrize("method,top_layers", [("sharelora", None), ("shared", 1)])
def test_distinct_rows_give_the_per_pair_margins(tiny_text_backbone, method, top_layers):
    from sharelora.evaluate import predict_margins
    from sharelora.pairs import PairRun
    from sharelora.prefix import PrefixCache

    model = _model(tiny_text_backbone, method, top_layers=top_layers)
    randomize(model)
    # Every text appears in several pairs and for both users.
    data = [
        Comparison("q?", a, b, u)
        for u in ("sunny", "rainy")
        for a, b in [("yes a", "no b"), ("yes a", "no c"), ("no b", "no c"), ("yes a", "no b")]
    ]
    cache = PrefixCache(model) if top_layers else None
    run = PairRun(model, None, data, 32, cache, progress=False)
    per_pair = predict_margins(model, run.val, 3, run=run, distinct=False)
    distinct = predict_margins(model, run.val, 3, run=run)
    torch.testing.assert_close(torch.tensor(distinct), torch.tensor(per_pair), rtol=1e-5, atol=1e-6)
    rows = run.distinct_rows(run.val, share_users=method == "shared")
    assert len(rows) == (3 if method == "shared" else 6) < 2 * len(data)

"""The frozen-prefix cache gives the same rewards and gradients as the full forward."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_batch

from sharelora import AdapterConfig, PersonalizedRewardModel
from sharelora.prefix import PrefixCache


def _pad(rows):
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2", "gptj"])
def test_cached_prefix_equals_full_forward(tiny_dirs, arch):
    torch.manual_seed(0)
    model = PersonalizedRewardModel.from_backbone(
        tiny_dirs[arch], ["a", "b"], AdapterConfig(rank=2, top_layers=1)
    ).eval()
    assert all(".1." in name for name in model.adapter_layers)  # only the top block
    for p in model.user_parameters():
        torch.nn.init.normal_(p)
    for p in model.shared_parameters():
        torch.nn.init.normal_(p, std=0.3)
    ids, mask = tiny_batch(batch=4)
    rows = [{"input_ids": ids[i][mask[i].bool()].tolist()} for i in range(4)]
    cache = PrefixCache(model)
    index = cache.add({"input_ids": [r["input_ids"] for r in rows]}, _pad, progress=False)
    assert cache.add({"input_ids": [rows[0]["input_ids"]]}, _pad, progress=False) == [index[0]]
    users = torch.tensor([0, 1, 1, 0])
    full = model(input_ids=ids, attention_mask=mask, user_ids=users)
    with cache.use(cache.batch(index, mask)):
        cached = model(input_ids=ids, attention_mask=mask, user_ids=users)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    grads = []
    for out in (full, cached):
        model.zero_grad()
        out.square().sum().backward(retain_graph=True)
        grads.append([p.grad.clone() for p in model.user_parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # The blocks are restored after use.
    assert not any(type(b).__name__ == "_PassThrough" for b in cache.blocks)


def test_prefix_cache_needs_a_frozen_prefix(tiny_dirs):
    model = PersonalizedRewardModel.from_backbone(tiny_dirs["bert"], ["a"], AdapterConfig())
    with pytest.raises(ValueError, match="no frozen prefix"):
        PrefixCache(model)
    with pytest.raises(ValueError, match="top_layers=5 but the model has 2 blocks"):
        PersonalizedRewardModel.from_backbone(tiny_dirs["bert"], ["a"], AdapterConfig(top_layers=5))


def test_training_through_the_cache_equals_training_without_it(tmp_path):
    """End to end: same weights, same validation accuracy. The cache runs the frozen blocks in
    eval mode, so the backbone here has no dropout (with dropout the uncached path would apply
    it inside the frozen blocks too)."""
    from conftest import opposite_tastes, save_text_backbone

    from sharelora.recipe import TrainConfig, train

    path = save_text_backbone(tmp_path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    data, val = opposite_tastes(12), opposite_tastes(6, seed=1)
    runs = []
    for cache_prefix in (True, False):
        torch.manual_seed(0)
        model = PersonalizedRewardModel.from_backbone(
            path, ["sunny", "rainy"], AdapterConfig(rank=2, top_layers=1)
        )
        cfg = TrainConfig(
            epochs=2,
            lr=1e-2,
            batch_size=4,
            max_length=32,
            progress=False,
            cache_prefix=cache_prefix,
        )
        runs.append((model, train(model, data, val, cfg)))
    (cached, a), (full, b) = runs
    assert a["prefix_cache"] is not None and b["prefix_cache"] is None
    for name, tensor in cached.trainable_state_dict().items():
        torch.testing.assert_close(tensor, full.trainable_state_dict()[name], atol=1e-4, rtol=1e-4)
    assert a["val_metrics"]["users"] == b["val_metrics"]["users"]


@pytest.mark.parametrize("method,share_users", [("shared", True), ("sharelora", False)])
def test_a_batch_runs_each_distinct_row_once_with_the_same_rewards_and_gradients(
    tiny_text_backbone, method, share_users, monkeypatch
):
    from sharelora import pairs as pairs_module
    from sharelora.data import Comparison
    from sharelora.pairs import PairRun, pair_rewards

    torch.manual_seed(0)
    model = PersonalizedRewardModel.from_backbone(
        tiny_text_backbone, ["a", "b"], AdapterConfig(method=method, rank=2, top_layers=1)
    ).eval()
    for p in model.shared_parameters() + model.user_parameters():
        torch.nn.init.normal_(p, std=0.3)
    # Pairs that repeat texts, for one user and across users.
    data = [
        Comparison("", "sunny day", "rainy day", "a"),
        Comparison("", "sunny day", "cold night", "a"),
        Comparison("", "rainy day", "sunny day", "b"),
        Comparison("", "cold night", "warm tea", "b"),
    ]
    run = PairRun(model, data, None, 32, PrefixCache(model), progress=False)
    batch = run.train.collate([run.train[i] for i in range(len(data))])
    rows_seen = []
    real = pairs_module.pair_rewards
    monkeypatch.setattr(
        pairs_module,
        "pair_rewards",
        lambda m, b, *a: rows_seen.append(len(b["input_ids"])) or real(m, b, *a),
    )
    got = run.rewards(model, run.train, batch, share_users)
    # shared: 4 distinct texts; sharelora: 7 distinct (user, text) rows of 8.
    assert rows_seen == [4 if share_users else 7]
    chosen, rejected = run.index[id(run.train)]
    indices = chosen + rejected
    expected = pair_rewards(
        model, {k: v for k, v in batch.items() if k != "index"}, run.cache, indices
    )
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    grads = []
    for out in (got, expected):
        model.zero_grad()
        out.square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

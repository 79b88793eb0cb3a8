"""PersonalAdamW: AdamW on shared parameters, lazy row-wise Adam on row-sparse user tables."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize, tiny_batch

from sharelora import METHODS, AdapterConfig, PersonalAdamW, PersonalizedRewardModel
from sharelora.config import SPARSE_USERS_THRESHOLD
from sharelora.optim import build_optimizer, clip_grad_norm_

PERSONAL = [m for m in METHODS if m != "shared"]


def test_dense_groups_are_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    b = torch.nn.Parameter(a.detach().clone())
    ours = PersonalAdamW([a], lr=0.1, weight_decay=0.01)
    ref = torch.optim.AdamW([b], lr=0.1, weight_decay=0.01)
    for step in range(5):
        g = torch.randn(5, 3, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def _model(path, method, users=("a", "b", "c")):
    torch.manual_seed(0)
    model = PersonalizedRewardModel.from_backbone(path, list(users), AdapterConfig(method, rank=2))
    randomize(model)
    return model


def _steps(model, sparse, batches, steps=3):
    opt = build_optimizer(model, lr=0.05, sparse_users=sparse)
    for step in range(steps):
        ids, mask = tiny_batch(batch=len(batches[step]), seed=step)
        users = torch.tensor(batches[step])
        opt.zero_grad()
        model(input_ids=ids, attention_mask=mask, user_ids=users).square().mean().backward()
        grads = [p.grad for p in model.user_parameters()]
        assert all(g.is_sparse == sparse for g in grads)
        opt.step()
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("method", PERSONAL)
def test_lazy_equals_dense_adam_when_every_user_is_in_every_batch(tiny_dirs, method):
    batches = [[0, 1, 2, 2], [2, 1, 0, 0], [1, 0, 2, 1]]
    dense = _steps(_model(tiny_dirs["llama"], method), False, batches)
    lazy = _steps(_model(tiny_dirs["llama"], method), True, batches)
    for d, s in zip(dense, lazy, strict=True):
        torch.testing.assert_close(d, s, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", PERSONAL)
def test_sparse_gradient_equals_dense_gradient(tiny_dirs, method):
    grads = []
    for sparse in (False, True):
        model = _model(tiny_dirs["gpt2"], method)
        model.router.sparse_grads = sparse
        ids, mask = tiny_batch(batch=4)
        model(
            input_ids=ids, attention_mask=mask, user_ids=torch.tensor([2, 0, 2, 2])
        ).sum().backward()
        grads.append([p.grad.to_dense() for p in model.user_parameters()])
    for d, s in zip(*grads, strict=True):
        torch.testing.assert_close(d, s, atol=1e-6, rtol=1e-5)
        assert torch.count_nonzero(s[1]) == 0


def test_lazy_adam_leaves_absent_users_alone(tiny_dirs):
    # User 2 is in the first batch only: dense Adam keeps moving its row by momentum, lazy Adam
    # leaves it where its last update put it.
    batches = [[0, 2], [0, 1], [1, 0]]
    for sparse in (False, True):
        model = _model(tiny_dirs["bert"], "sharelora")
        opt = build_optimizer(model, lr=0.05, sparse_users=sparse)
        table = model.user_parameters()[0]
        history = []
        for step, users in enumerate(batches):
            ids, mask = tiny_batch(batch=2, seed=step)
            opt.zero_grad()
            model(input_ids=ids, attention_mask=mask, user_ids=torch.tensor(users)).sum().backward()
            opt.step()
            history.append(table[2].detach().clone())
        assert torch.equal(history[0], history[2]) == sparse
        if sparse:
            assert opt.state[table]["step"].tolist() == [3, 2, 1]


def test_clip_grad_norm_with_sparse_grads():
    dense = torch.nn.Parameter(torch.zeros(4, 2))
    table = torch.nn.Parameter(torch.zeros(5, 2))
    dense.grad = torch.full((4, 2), 3.0)
    idx = torch.tensor([[1, 1, 4]])
    table.grad = torch.sparse_coo_tensor(
        idx, torch.full((3, 2), 4.0), (5, 2), check_invariants=True
    )
    reference = torch.cat([dense.grad.flatten(), table.grad.to_dense().flatten()])
    norm = clip_grad_norm_([dense, table], max_norm=1.0)
    assert norm == pytest.approx(float(reference.norm()))
    clipped = torch.cat([dense.grad.flatten(), table.grad.to_dense().flatten()])
    assert float(clipped.norm()) == pytest.approx(1.0, rel=1e-4)


def test_user_groups_never_decay(tiny_dirs):
    model = _model(tiny_dirs["bert"], "sharelora")
    opt = build_optimizer(model, weight_decay=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    with pytest.raises(ValueError, match="no weight decay"):
        PersonalAdamW([{"params": model.user_parameters(), "lazy": True, "weight_decay": 0.1}])
    with pytest.raises(ValueError, match="sparse_users must be one of"):
        build_optimizer(model, sparse_users="sometimes")


def test_build_optimizer_defaults_to_auto_like_the_command_line(tiny_dirs):
    few = _model(tiny_dirs["bert"], "sharelora")
    build_optimizer(few)
    assert few.router.sparse_grads is False
    many = _model(tiny_dirs["bert"], "diag", users=[f"u{i}" for i in range(SPARSE_USERS_THRESHOLD)])
    build_optimizer(many)
    assert many.router.sparse_grads is True
    with pytest.raises(TypeError):
        build_optimizer(few, user_lr=1e-3)  # an absolute user lr: user_lr_scale is the knob


@pytest.mark.parametrize("sparse", [False, True])
def test_user_lr_scale_scales_the_user_tables_step_alone(tiny_dirs, sparse):
    def moved(scale):
        model = _model(tiny_dirs["bert"], "sharelora")
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        opt = build_optimizer(model, lr=0.01, sparse_users=sparse, user_lr_scale=scale)
        ids, mask = tiny_batch(batch=3, seed=0)
        model(input_ids=ids, attention_mask=mask, user_ids=torch.tensor([0, 1, 1])).sum().backward()
        opt.step()
        users = {id(p) for p in model.user_parameters()}
        return {
            (n, id(p) in users): p.detach() - before[n]
            for n, p in model.named_parameters()
            if p.requires_grad
        }

    one, four = moved(1.0), moved(4.0)
    assert any(is_user for _, is_user in one) and any(not is_user for _, is_user in one)
    for (name, is_user), step in one.items():
        # Adam's step is lr times a ratio the scale does not touch.
        expected = 4 * step if is_user else step
        torch.testing.assert_close(four[(name, is_user)], expected, rtol=1e-5, atol=1e-8)


def test_rowwise_state_is_one_number_per_row_and_lazy(tiny_dirs):
    model = _model(tiny_dirs["bert"], "sharelora")
    opt = build_optimizer(
        model, lr=0.05, sparse_users="on", user_state="rowwise", user_lr_scale=1
    )  # the user tables step at lr
    table = model.user_parameters()[0]
    before = table.detach().clone()
    ids, mask = tiny_batch(batch=2)
    model(input_ids=ids, attention_mask=mask, user_ids=torch.tensor([0, 2])).sum().backward()
    grad = table.grad.coalesce().to_dense()
    opt.step()
    state = opt.state[table]
    assert set(state) == {"step", "row_sq"} and state["row_sq"].shape == (3,)
    assert state["step"].tolist() == [1, 0, 1]
    assert torch.equal(table[1], before[1])  # user 1 was not in the batch
    # First step: v = (1 - β2)·mean(g²), bias-corrected to mean(g²): the row moves by
    # lr · g / rms(g), Adam's scale.
    for u in (0, 2):
        rms = grad[u].pow(2).mean().sqrt()
        torch.testing.assert_close(before[u] - table[u], 0.05 * grad[u] / (rms + 1e-8))


def test_rowwise_learns_like_full_adam(tiny_text_backbone):
    from conftest import opposite_tastes

    from sharelora.evaluate import evaluate
    from sharelora.recipe import TrainConfig, train

    accuracy = {}
    for state in ("full", "rowwise"):
        torch.manual_seed(0)
        model = PersonalizedRewardModel.from_backbone(
            tiny_text_backbone, ["sunny", "rainy"], AdapterConfig(rank=4)
        )
        # The optimizers alone: with the population learning too, rowwise needs more epochs
        # on this tiny set (0.6 at 6 epochs, 1.0 at 12).
        cfg = TrainConfig(
            epochs=6, lr=1e-2, batch_size=8, progress=False, max_length=32, user_state=state,
            train_population=False,
        )  # fmt: skip
        train(model, opposite_tastes(40), None, cfg)
        accuracy[state] = evaluate(model, opposite_tastes(15, seed=1))["macro_accuracy"]
    assert accuracy["rowwise"] >= 0.9 and accuracy["full"] >= 0.9, accuracy

"""The personalized reward model against dense references, PEFT, and its own exports."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, randomize, tiny_batch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification

from sharelora import METHODS, AdapterConfig, PersonalizedRewardModel
from sharelora.export import export_user

USERS = ["ann", "bob", "cy"]
CASES = [(arch, method) for arch in ARCHS for method in METHODS]
ATOL = 1e-5


def build(path, method, users=USERS, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = AdapterConfig(method=method, rank=4, alpha=8, **kw)
    model = PersonalizedRewardModel.from_backbone(path, users=users, adapter=cfg)
    return model.eval()


def fresh(path):
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()


def rewards(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits.squeeze(-1)


def dense_reference(model, path, user: int):
    """A plain backbone with ``W0 + s·B_u M_u A_u`` written in by hand from the raw factors."""
    ref = fresh(path)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        own = dict(model.backbone.named_parameters())
        for name in model.trainable_backbone_names:
            params[name].copy_(own[name])
        for name, layer in model.adapter_layers.items():
            p = dict(layer.named_parameters(recurse=False))
            if "user_W" in p:  # the head method: w̄ + δ_u
                params[f"{name}.weight"] += p["user_W"][user]
                continue
            a = p["user_A"][user] if "user_A" in p else p["lora_A"]
            b = p["user_B"][user] if "user_B" in p else p["lora_B"]
            mix = torch.eye(layer.rank)
            if "user_C" in p:
                mix = p["user_C"][user]
            if "user_d" in p:
                mix = torch.diag(p["user_d"][user])
            delta = layer.scale * b @ mix @ a  # [out, in]
            w = params[f"{name}.weight"]
            w += delta.T if layer.fan_in_fan_out else delta
    return ref


@pytest.mark.parametrize("arch,method", CASES)
def test_zero_delta_at_init(tiny_dirs, arch, method):
    model = build(tiny_dirs[arch], method)
    ids, mask = tiny_batch()
    users = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, user_ids=users)
    torch.testing.assert_close(got, rewards(fresh(tiny_dirs[arch]), ids, mask), atol=0, rtol=0)


@pytest.mark.parametrize("arch,method", CASES)
def test_mixed_batch_equals_each_user_alone(tiny_dirs, arch, method):
    model = build(tiny_dirs[arch], method)
    randomize(model)
    ids, mask = tiny_batch()
    users = torch.tensor([2, 0, 1, 1, 2, 0])
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, user_ids=users)
        for row in range(len(users)):
            alone = model(
                input_ids=ids[row : row + 1],
                attention_mask=mask[row : row + 1],
                user_ids=users[row : row + 1],
            )
            torch.testing.assert_close(mixed[row : row + 1], alone, atol=ATOL, rtol=1e-5)
    if METHODS[method].personalized:
        # Routing matters: the same rows under other users give other rewards.
        other = model(input_ids=ids, attention_mask=mask, user_ids=(users + 1) % 3)
        assert not torch.allclose(mixed, other, atol=1e-3)


@pytest.mark.parametrize("arch,method", CASES)
def test_routed_output_equals_dense_reference(tiny_dirs, arch, method):
    model = build(tiny_dirs[arch], method)
    randomize(model, seed=1)
    ids, mask = tiny_batch(seed=1)
    for user in range(len(USERS)):
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask, user_ids=torch.full((6,), user))
        ref = rewards(dense_reference(model, tiny_dirs[arch], user), ids, mask)
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("arch,method", CASES)
def test_gradient_isolation(tiny_dirs, arch, method):
    model = build(tiny_dirs[arch], method).train()
    randomize(model, seed=2)
    ids, mask = tiny_batch(batch=2)
    model(input_ids=ids, attention_mask=mask, user_ids=torch.tensor([1, 1])).sum().backward()
    tables = model.user_parameters()
    assert bool(tables) == (method != "shared")
    for table in tables:
        assert table.grad[1].abs().sum() > 0, "the user in the batch must get a gradient"
        assert torch.count_nonzero(table.grad[[0, 2]]) == 0, "other users must get exactly zero"


@pytest.mark.parametrize("arch,method", CASES)
def test_save_load_round_trip(tiny_dirs, arch, method, tmp_path):
    model = build(tiny_dirs[arch], method)
    randomize(model, seed=3)
    model.save_pretrained(tmp_path / "m")
    loaded = PersonalizedRewardModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.users == model.users and loaded.adapter_config == model.adapter_config
    ids, mask = tiny_batch(seed=3)
    users = torch.tensor([0, 1, 2, 2, 1, 0])
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, user_ids=users)
        b = loaded(input_ids=ids, attention_mask=mask, user_ids=users)
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch,method", CASES)
def test_merged_export_equals_routed_model(tiny_dirs, arch, method, tmp_path):
    model = build(tiny_dirs[arch], method)
    randomize(model, seed=4)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    export_user(model, "bob", tmp_path / "bob", format="merged")
    after = model.backbone.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "export must not touch W0"
    ids, mask = tiny_batch(seed=4)
    plain = fresh(tmp_path / "bob")
    assert not any("lora" in n or "user_" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, user_ids=torch.full((6,), 1))
    torch.testing.assert_close(rewards(plain, ids, mask), want, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("arch,method", CASES)
def test_peft_export_loads_and_equals_routed_model(tiny_dirs, arch, method, tmp_path):
    model = build(tiny_dirs[arch], method)
    randomize(model, seed=5)
    export_user(model, "cy", tmp_path / "cy", format="peft")
    peft_model = PeftModel.from_pretrained(fresh(tiny_dirs[arch]), tmp_path / "cy").eval()
    ids, mask = tiny_batch(seed=5)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, user_ids=torch.full((6,), 2))
    torch.testing.assert_close(rewards(peft_model, ids, mask), want, atol=ATOL, rtol=1e-4)


def _peft_twin(path, model, user=None):
    """PEFT LoRA on the same backbone holding ``model``'s factors (for ``user``) and head."""
    cfg = model.adapter_config
    layers = model.adapter_layers
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        target_modules=cfg.targets,
        task_type="SEQ_CLS",
        fan_in_fan_out=next(iter(layers.values())).fan_in_fan_out,
    )
    peft_model = get_peft_model(fresh(path), lora).eval()
    params = dict(peft_model.named_parameters())
    own = dict(model.backbone.named_parameters())
    with torch.no_grad():
        for name, layer in layers.items():
            a = layer.lora_A if user is None else layer.user_A[user]
            params[f"base_model.model.{name}.lora_A.default.weight"].copy_(a)
            params[f"base_model.model.{name}.lora_B.default.weight"].copy_(layer.lora_B)
        for name in model.trainable_backbone_names:
            head, leaf = name.rsplit(".", 1)
            params[f"base_model.model.{head}.modules_to_save.default.{leaf}"].copy_(own[name])
    return peft_model


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_equals_peft_lora(tiny_dirs, arch):
    model = build(tiny_dirs[arch], "shared")
    randomize(model, seed=6)
    ids, mask = tiny_batch(seed=6)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask)
    want = rewards(_peft_twin(tiny_dirs[arch], model), ids, mask)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_sharelora_with_one_user_equals_plain_lora(tiny_dirs, arch):
    model = build(tiny_dirs[arch], "sharelora", users=["solo"])
    randomize(model, seed=7)
    ids, mask = tiny_batch(seed=7)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, user_ids=torch.zeros(6, dtype=torch.long))
    want = rewards(_peft_twin(tiny_dirs[arch], model, user=0), ids, mask)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_keeps_routing(tiny_dirs, arch):
    grads, calls = [], []
    for checkpointing in (False, True):
        model = build(tiny_dirs[arch], "sharelora").train()
        randomize(model, seed=8)
        if checkpointing:
            model.gradient_checkpointing_enable()
        layer = next(iter(model.adapter_layers.values()))
        count = []
        layer.register_forward_hook(lambda *_, count=count: count.append(1))
        ids, mask = tiny_batch(seed=8)
        users = torch.tensor([0, 1, 2, 0, 1, 2])
        model(input_ids=ids, attention_mask=mask, user_ids=users).sum().backward()
        grads.append([p.grad.clone() for p in model.user_parameters()])
        calls.append(len(count))
    assert calls == [1, 2], "with checkpointing the layer must run again in backward"
    for plain, ckpt in zip(*grads, strict=True):
        torch.testing.assert_close(plain, ckpt, atol=1e-6, rtol=1e-5)


def test_a_registered_method_needs_no_other_code(tiny_dirs, tmp_path, request):
    """A new method is one ``MethodSpec``: routing, the dense reference and the PEFT export
    follow from it (here: A_u with a per-user diagonal, B shared)."""
    from sharelora.config import MethodSpec, register_method

    request.addfinalizer(lambda: METHODS.pop("sharelora-diag", None))
    register_method("sharelora-diag", MethodSpec(("A",), mixer="diag", help="A_u and d_u"))
    with pytest.raises(ValueError, match="taken"):
        register_method("sharelora-diag", MethodSpec())
    model = build(tiny_dirs["llama"], "sharelora-diag")
    randomize(model, seed=4)
    assert {t.shape[0] for t in model.user_parameters()} == {len(USERS)}
    ids, mask = tiny_batch(seed=4)
    for user in range(len(USERS)):
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask, user_ids=torch.full((6,), user))
        ref = rewards(dense_reference(model, tiny_dirs["llama"], user), ids, mask)
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=1e-4)
    export_user(model, "bob", tmp_path / "bob", format="peft")
    base = fresh(tiny_dirs["llama"])
    peft = PeftModel.from_pretrained(base, tmp_path / "bob").eval()
    torch.testing.assert_close(
        rewards(peft, ids, mask), rewards(dense_reference(model, tiny_dirs["llama"], 1), ids, mask),
        atol=ATOL, rtol=1e-4,
    )  # fmt: skip


@pytest.mark.parametrize("method", ["sharelora", "independent", "core"])
def test_one_users_batch_scores_as_the_gathered_path(tiny_dirs, method):
    """Scoring rows of one user takes that user's factors as shared ones (one matmul); the
    gathered bmm path (taken with gradients on) gives the same rewards."""
    model = build(tiny_dirs["bert"], method)
    randomize(model, seed=5)
    ids, mask = tiny_batch(seed=5)
    users = torch.full((6,), 2)
    with torch.no_grad():
        fast = model(input_ids=ids, attention_mask=mask, user_ids=users)
    gathered = model(input_ids=ids, attention_mask=mask, user_ids=users).detach()
    torch.testing.assert_close(fast, gathered, atol=ATOL, rtol=1e-5)

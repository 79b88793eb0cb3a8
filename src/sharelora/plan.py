"""Parameter and memory budget of a personalized reward model, from the backbone config alone.

The model is built on PyTorch's ``meta`` device: shapes without storage, so a 7B config costs
nothing to inspect and no weights are downloaded.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from .backbone import BackboneError, gguf_location, resolve_backbone
from .config import METHODS, AdapterConfig

GiB = 1024**3


def parameter_counts(
    backbone: str, adapter: AdapterConfig, trust_remote_code: bool = False
) -> dict[str, int]:
    """``{"frozen", "shared", "per_user", "user_tables"}`` for one user of ``adapter`` on
    ``backbone`` (``user_tables``: how many per-user tables, one row each per user)."""
    from .model import PersonalizedRewardModel

    path, gguf_file = gguf_location(resolve_backbone(backbone))
    where = {"gguf_file": gguf_file} if gguf_file else {}  # a GGUF file's metadata is its config
    try:
        config = AutoConfig.from_pretrained(
            path, num_labels=1, trust_remote_code=trust_remote_code, **where
        )
    except (OSError, ValueError) as err:
        raise BackboneError(
            f"cannot read the config of {backbone!r} ({str(err).strip().splitlines()[0]}); pass "
            "a local directory with config.json if the Hugging Face Hub is unreachable"
        ) from err
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = 0  # only shapes matter here
    with torch.device("meta"):
        body = AutoModelForSequenceClassification.from_config(
            config, trust_remote_code=trust_remote_code
        )
        model = PersonalizedRewardModel(body, ["u"], adapter)
    report = model.parameter_report()
    counts = {k: report[k] for k in ("frozen", "shared", "per_user")}
    return counts | {"user_tables": len(model.user_parameters())}


def budget(
    counts: dict[str, int],
    users: int,
    weight_bytes: int = 4,
    batch_users: int = 16,
    sparse: bool | None = None,
    user_state: str = "full",
) -> dict:
    """Memory for weights, gradients and optimizer state (fp32 adapters, ``weight_bytes`` per
    frozen weight). With row-sparse user tables only ``batch_users`` rows get gradients per
    step. User tables' state: ``full`` Adam (two fp32 moments per coordinate) or ``rowwise``
    (one fp32 scalar and one int64 step count per row and table)."""
    from .optim import SPARSE_USERS_THRESHOLD

    sparse = users >= SPARSE_USERS_THRESHOLD if sparse is None else sparse
    user_total = counts["per_user"] * users
    trainable = counts["shared"] + user_total
    grad_rows = min(users, batch_users) if sparse else users
    shared_adam = 2 * counts["shared"] * 4
    user_state_bytes = {
        "full": 2 * user_total * 4,
        "rowwise": users * counts.get("user_tables", 0) * (4 + 8),
    }
    optimizer = {k: shared_adam + v for k, v in user_state_bytes.items()}
    # --user-tables host: the tables and their state in host memory; on the device the frozen
    # weights, shared factors with their Adam state and gradients, and the batch's rows.
    batch_rows = counts["per_user"] * min(users, batch_users) * 4
    host_bytes = user_total * 4 + user_state_bytes[user_state]
    device_bytes = counts["frozen"] * weight_bytes + counts["shared"] * 4 * 4 + 2 * batch_rows
    return {
        "users": users,
        "per_user": counts["per_user"],
        "shared": counts["shared"],
        "trainable": trainable,
        "frozen": counts["frozen"],
        "sparse_user_tables": sparse,
        "user_state": user_state,
        "weights_gib": (counts["frozen"] * weight_bytes + trainable * 4) / GiB,
        "gradients_gib": (counts["shared"] + counts["per_user"] * grad_rows) * 4 / GiB,
        "optimizer_gib": optimizer[user_state] / GiB,
        "optimizer_full_gib": optimizer["full"] / GiB,
        "optimizer_rowwise_gib": optimizer["rowwise"] / GiB,
        "host_tables_device_gib": device_bytes / GiB,
        "host_tables_host_gib": host_bytes / GiB,
    }


def total_gib(b: dict) -> float:
    return b["weights_gib"] + b["gradients_gib"] + b["optimizer_gib"]


def recommend(budgets: dict[str, dict], memory_gib: float) -> tuple[str | None, str]:
    """The most expressive personalized method (sharelora, then core, then diag) whose weights,
    gradients and AdamW state fit ``memory_gib`` (activations come on top)."""
    for method in ("sharelora", "core", "diag"):
        need = total_gib(budgets[method])
        if need <= memory_gib:
            return method, f"weights + gradients + Adam state {need:.2f} GiB <= {memory_gib:g} GiB"
    need = total_gib(budgets["diag"])
    return None, (
        f"even diag needs {need:.2f} GiB > {memory_gib:g} GiB: shard users across "
        "runs or use a larger device"
    )


def plan_table(
    backbone: str,
    adapter: AdapterConfig,
    users: int,
    weight_bytes: int = 4,
    memory_gib: float = 80.0,
    trust_remote_code: bool = False,
    user_state: str = "full",
) -> tuple[str, dict]:
    """A markdown table of every method's budget at ``users`` users, and the details."""
    budgets = {}
    for method in METHODS:
        cfg = AdapterConfig(**{**adapter.to_dict(), "method": method})
        counts = parameter_counts(backbone, cfg, trust_remote_code)
        budgets[method] = budget(counts, users, weight_bytes, user_state=user_state)
    targets = cfg.targets  # resolved to the architecture's default when none were given
    best, why = recommend(budgets, memory_gib)
    lines = [
        f"backbone {backbone}: {budgets['shared']['frozen']:,} frozen parameters; rank "
        f"{adapter.rank}, targets {','.join(targets)}, {users:,} users",
        "",
        "| method | per user | shared | total trainable | weights GiB | grads GiB "
        "| Adam state GiB, full | row-wise | host tables: device GiB | host GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, b in budgets.items():
        mark = "**" if method == adapter.method else ""
        lines.append(
            f"| {mark}{method}{mark} | {b['per_user']:,} | {b['shared']:,} | "
            f"{b['trainable']:,} | {b['weights_gib']:.2f} | {b['gradients_gib']:.2f} | "
            f"{b['optimizer_full_gib']:.2f} | {b['optimizer_rowwise_gib']:.2f} | "
            f"{b['host_tables_device_gib']:.2f} | {b['host_tables_host_gib']:.2f} |"
        )
    lines += [
        "",
        f"recommended at {users:,} users with {user_state} user state: "
        f"{best or 'none fits'} ({why})",
    ]
    return "\n".join(lines), {"methods": budgets, "recommended": best}

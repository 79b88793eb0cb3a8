"""The paper's claim in the linear setting: sharing a low-rank structure lowers the comparisons
each user must give.

Model. Comparison features ``z = φ(x, y+) − φ(x, y−) ~ N(0, I_d)``; user ``u`` prefers ``y+``
with probability ``σ(θ_u·z)`` (Bradley-Terry), where

    θ_u = θ0 + B* a_u + δ_u      θ0 ~ N(0, I_d / d)·|θ0| , B* [d, r] orthonormal,
                                 a_u ~ N(0, s²I_r) , δ_u ~ N(0, σ²I_d / d) (optional)

Estimators (maximum likelihood with the same ridge ``λ·|params|²``, λ = 1 against the summed
log-likelihood, i.e. a unit Gaussian prior on every parameter, for all: with fewer comparisons
than dimensions a user's data is separable and the pure MLE is infinite):

    shared       one θ for everyone
    independent  one θ_u per user
    sharelora    θ_u = θ0 + B a_u, with θ0, B [d, r] and a_u learned jointly, started at the
                 shared fit; the prior on the loadings a_u has a learned scale: its ridge
                 λ_a is chosen from ``LOADING_RIDGES`` by held-out likelihood (5-fold
                 cross-validation over every user's comparisons), then refitted on all
    oracle       θ_u = θ0 + B* a_u, knowing B*

Reported per (estimator, n, N, r, seed): ``param_error`` = mean over users of |θ̂_u − θ_u| and
held-out preference ``accuracy`` (against labels drawn from the true model).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

ESTIMATORS = ("shared", "independent", "sharelora", "oracle")
# The ridges on sharelora's per-user loadings that cross-validation (FOLDS folds of every
# user's comparisons) chooses from: the scale of the prior on the loadings.
LOADING_RIDGES = (1.0, 3.0, 10.0, 30.0, 100.0)
FOLDS = 5


@dataclass
class SimConfig:
    """The sweep and the generating model (defaults: the setting in docs/theory.md)."""

    n: list[int] = field(default_factory=lambda: [5, 10, 20, 50, 100, 200])
    users: list[int] = field(default_factory=lambda: [10, 100])
    rank: list[int] = field(default_factory=lambda: [2])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    dim: int = 16
    theta0_norm: float = 1.0
    spread: float = 2.0  # s: scale of the user loadings a_u
    individual: float = 0.0  # σ: norm scale of the individual perturbation δ_u
    ridge: float = 1.0
    test_per_user: int = 500
    steps: int = 200

    def __post_init__(self):
        for name in ("n", "users", "rank", "seeds"):
            values = getattr(self, name)
            if not values or not all(
                isinstance(v, int) and v >= (0 if name == "seeds" else 1) for v in values
            ):
                raise ValueError(f"{name} must be a list of positive integers, got {values!r}")
        if any(r >= self.dim for r in self.rank):
            raise ValueError(f"rank must be below dim ({self.dim})")


def make_task(cfg: SimConfig, n: int, users: int, rank: int, seed: int) -> dict:
    """True parameters, training comparisons ``[N, n, d]`` and test comparisons."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + users * 1009 + rank)
    d = cfg.dim
    basis, _ = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))
    theta0 = torch.randn(d, generator=g, dtype=torch.float64)
    theta0 *= cfg.theta0_norm / theta0.norm()
    a = cfg.spread * torch.randn(users, rank, generator=g, dtype=torch.float64)
    delta = cfg.individual / math.sqrt(d) * torch.randn(users, d, generator=g, dtype=torch.float64)
    theta = theta0 + a @ basis.T + delta  # [N, d]
    # The training sets of one sweep nest (the first n of the largest), as if data arrived.
    z = torch.randn(users, max(cfg.n), d, generator=g, dtype=torch.float64)
    draw = torch.rand(users, max(cfg.n), generator=g, dtype=torch.float64)
    z, draw = z[:, :n], draw[:, :n]
    y = (draw < torch.sigmoid(torch.einsum("und,ud->un", z, theta))).double()
    zt = torch.randn(users, cfg.test_per_user, d, generator=g, dtype=torch.float64)
    yt = (
        torch.rand(users, cfg.test_per_user, generator=g, dtype=torch.float64)
        < torch.sigmoid(torch.einsum("und,ud->un", zt, theta))
    ).double()
    return {"theta": theta, "basis": basis, "z": z, "y": y, "z_test": zt, "y_test": yt}


def _fit(params: list[torch.Tensor], thetas, z, y, ridge, steps: int) -> torch.Tensor:
    """Maximise the ridge-penalised Bradley-Terry likelihood with L-BFGS; returns θ̂ [N, d].
    ``ridge`` is one λ for every parameter or one per parameter."""
    ridges = ridge if isinstance(ridge, (list, tuple)) else [ridge] * len(params)
    opt = torch.optim.LBFGS(
        params,
        lr=1,
        max_iter=steps,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    count = y.numel()

    def closure():
        opt.zero_grad()
        logits = torch.einsum("und,ud->un", z, thetas())
        nll = F.binary_cross_entropy_with_logits(logits, y, reduction="sum")
        penalty = sum(lam * p.pow(2).sum() for lam, p in zip(ridges, params, strict=True))
        loss = (nll + penalty) / count
        loss.backward()
        return loss

    opt.step(closure)
    return thetas().detach()


def estimate(name: str, task: dict, rank: int, cfg: SimConfig, seed: int) -> torch.Tensor:
    """θ̂ ``[N, d]`` of estimator ``name``."""
    z, y, basis = task["z"], task["y"], task["basis"]
    users, d = z.shape[0], z.shape[2]

    def zeros(*shape):
        return torch.zeros(*shape, dtype=torch.float64, requires_grad=True)

    if name == "shared":
        theta = zeros(d)
        return _fit([theta], lambda: theta.expand(users, d), z, y, cfg.ridge, cfg.steps)
    if name == "independent":
        theta = zeros(users, d)
        return _fit([theta], lambda: theta, z, y, cfg.ridge, cfg.steps)
    if name == "oracle":
        theta0, a = zeros(d), zeros(users, rank)
        return _fit([theta0, a], lambda: theta0 + a @ basis.T, z, y, cfg.ridge, cfg.steps)
    if name == "sharelora":
        start = estimate("shared", task, rank, cfg, seed)[0]
        folds = min(FOLDS, z.shape[1])

        def held_out_nll(ridge_a: float) -> float:
            total = 0.0
            for k in range(folds):
                held = torch.arange(z.shape[1]) % folds == k  # [n]: this fold's comparisons
                theta = _sharelora(start, z[:, ~held], y[:, ~held], rank, cfg, seed, ridge_a)
                logits = torch.einsum("und,ud->un", z[:, held], theta)
                total += F.binary_cross_entropy_with_logits(
                    logits, y[:, held], reduction="sum"
                ).item()
            return total

        best = min(LOADING_RIDGES, key=held_out_nll)
        return _sharelora(start, z, y, rank, cfg, seed, best)
    raise ValueError(f"unknown estimator {name!r}; choose from {ESTIMATORS}")


def _sharelora(start, z, y, rank: int, cfg: SimConfig, seed: int, ridge_a: float):
    """θ̂ of ``θ0 + B a_u`` from θ0 = ``start`` (the shared fit), ridge ``ridge_a`` on a_u."""
    users, d = z.shape[0], z.shape[2]
    g = torch.Generator().manual_seed(seed)
    theta0 = start.clone().requires_grad_()
    # B and a start small and random: at zero both gradients vanish (a saddle).
    b = (0.1 * torch.randn(d, rank, generator=g, dtype=torch.float64)).requires_grad_()
    a = (0.1 * torch.randn(users, rank, generator=g, dtype=torch.float64)).requires_grad_()
    ridges = [cfg.ridge, cfg.ridge, ridge_a]
    return _fit([theta0, b, a], lambda: theta0 + a @ b.T, z, y, ridges, cfg.steps)


def score(theta_hat: torch.Tensor, task: dict) -> dict:
    error = (theta_hat - task["theta"]).norm(dim=1).mean().item()
    predicted = torch.einsum("und,ud->un", task["z_test"], theta_hat) > 0
    accuracy = (predicted == task["y_test"].bool()).double().mean().item()
    return {"param_error": error, "accuracy": accuracy}


def run(cfg: SimConfig, estimators=ESTIMATORS, progress=None) -> list[dict]:
    rows = []
    for users, rank, seed, n in itertools.product(cfg.users, cfg.rank, cfg.seeds, cfg.n):
        task = make_task(cfg, n, users, rank, seed)
        for name in estimators:
            result = score(estimate(name, task, rank, cfg, seed), task)
            rows.append({"estimator": name, "n": n, "N": users, "r": rank, "seed": seed, **result})
        if progress:
            progress(
                f"N={users} r={rank} seed={seed} n={n}: "
                + ", ".join(
                    f"{r['estimator']} {r['param_error']:.2f}" for r in rows[-len(estimators) :]
                )
            )
    return rows


def summarize(rows: list[dict]) -> dict:
    """Mean and sd over seeds: {(N, r): {estimator: {n: (mean_err, sd_err, mean_acc)}}}."""
    groups: dict = {}
    for row in rows:
        key = (row["N"], row["r"], row["estimator"], row["n"])
        groups.setdefault(key, []).append(row)
    out: dict = {}
    for (users, rank, name, n), rs in sorted(groups.items()):
        errs = [r["param_error"] for r in rs]
        mean = sum(errs) / len(errs)
        sd = math.sqrt(sum((e - mean) ** 2 for e in errs) / max(len(errs) - 1, 1))
        acc = sum(r["accuracy"] for r in rs) / len(rs)
        out.setdefault((users, rank), {}).setdefault(name, {})[n] = (mean, sd, acc)
    return out


def markdown(summary: dict) -> str:
    lines = []
    for (users, rank), by_name in summary.items():
        ns = sorted(next(iter(by_name.values())))
        lines += [
            f"N = {users} users, r = {rank}: parameter error (mean ± sd over seeds), "
            "held-out accuracy",
            "",
            "| estimator | " + " | ".join(f"n={n}" for n in ns) + " |",
            "|---|" + "---|" * len(ns),
        ]
        for name, by_n in by_name.items():
            cells = [f"{by_n[n][0]:.2f} ± {by_n[n][1]:.2f} ({by_n[n][2]:.3f})" for n in ns]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(summary)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, key in zip(axes[0], panels, strict=True):
        for name, by_n in summary[key].items():
            ns = sorted(by_n)
            ax.errorbar(
                ns,
                [by_n[n][0] for n in ns],
                yerr=[by_n[n][1] for n in ns],
                marker="o",
                capsize=3,
                label=name,
            )
        ax.set_xscale("log")
        ax.set_xlabel("comparisons per user (n)")
        ax.set_ylabel("mean |θ̂_u − θ_u|")
        ax.set_title(f"N = {key[0]} users, r = {key[1]}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def simulate(cfg: SimConfig, output_dir: str | Path, progress=None) -> dict:
    """Run the sweep; write ``results.json``, ``results.md`` and ``error_vs_n.png``."""
    from .files import write_json, write_text

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = run(cfg, progress=progress)
    summary = summarize(rows)
    write_json(
        out / "results.json",
        {"config": asdict(cfg), "rows": rows, "seconds": round(time.time() - started, 1)},
    )
    write_text(out / "results.md", markdown(summary))
    plot(summary, out / "error_vs_n.png")
    return {"rows": rows, "summary": summary}

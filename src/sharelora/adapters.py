"""The per-user LoRA layer (every method) and how a batch's user ids reach it.

For user ``u`` an adapted layer computes::

    y = W0 x + b + s * B_u C_u A_u x          s = alpha / r

        x ──► W0 (frozen) ───────────────────────────────┐
        │                                                ▼
        └─► dropout ─► A_u [r,in] ─► C_u [r,r] ─► B_u [out,r] ─► * s ─► (+) ─► y

where, depending on ``method``, each factor is either shared by all users or taken from a stacked
per-user table (design §1):

    method        A            C          B
    shared        A            -          B
    independent   A_u          -          B_u
    sharelora     A_u          -          B        (the default: P-ShareLoRA)
    sharelora-b   A            -          B_u
    core          A            C_u        B
    diag          A            diag(d_u)  B
    head          A            -          B        plus a per-user score head (PersonalHead)
    sharelora-head  A_u        -          B        plus a per-user score head

Per-user factors live in one tensor per layer (``user_A: [N, r, in]``, ...), gathered by user id
and applied with ``torch.bmm``: no module per user and no Python loop over users.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import math

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from .config import METHODS, AdapterConfig


class UserRouter:
    """Carries one forward call's user ids from the model to all of its adapter layers.

    The ids live in a ``ContextVar`` set only for the duration of ``route(...)``, so concurrent
    calls in other threads never see them. Activation checkpointing re-runs layers during
    backward, after ``route`` has exited; ``checkpoint_contexts`` captures the ids at forward
    time and re-establishes them for the recomputation (``torch.utils.checkpoint``'s
    ``context_fn``).
    """

    def __init__(self, num_users: int):
        self.num_users = num_users
        # Per-user tables receive row-sparse gradients (see _SparseRows) when set.
        self.sparse_grads = False
        # Per-user tables stay in host memory when the model moves (see PersonalLoRALayer).
        self.host_tables = False
        # While the population trains (sharelora.population.add_learner) its row of a table
        # holds base_scale · T̄ and every other row a deviation Δ_u: T_u = T̄ + Δ_u.
        self.base_row: int | None = None
        self.base_scale = 1.0
        self._ids: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
            "sharelora_user_ids", default=None
        )
        self._one: contextvars.ContextVar[int | None] = contextvars.ContextVar(
            "sharelora_one_user", default=None
        )

    @contextlib.contextmanager
    def route(self, user_ids: torch.Tensor | None):
        if user_ids is not None:
            user_ids = self.validate(user_ids)
        token = self._ids.set(user_ids)
        one = None
        if user_ids is not None and user_ids.numel() and not torch.is_grad_enabled():
            # Scoring one user's rows: each layer can use that user's factor as a shared one
            # (one matmul, no gathered copy per row). Training keeps the gather, whose
            # gradient is row-sparse; one check per forward, not per layer.
            first = int(user_ids[0])
            one = first if bool((user_ids == first).all()) else None
        token_one = self._one.set(one)
        try:
            yield
        finally:
            self._one.reset(token_one)
            self._ids.reset(token)

    def validate(self, user_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(user_ids, torch.Tensor):
            user_ids = torch.as_tensor(user_ids)
        if user_ids.dim() != 1 or user_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"user_ids must be a 1-D integer tensor [batch], got dtype {user_ids.dtype} "
                f"and shape {tuple(user_ids.shape)}"
            )
        if user_ids.numel() and (int(user_ids.min()) < 0 or int(user_ids.max()) >= self.num_users):
            raise ValueError(
                f"user_ids out of range: got values in [{int(user_ids.min())}, "
                f"{int(user_ids.max())}] but the model has {self.num_users} users (ids 0.."
                f"{self.num_users - 1}); map names with model.users.encode(...)"
            )
        return user_ids.long()

    def __deepcopy__(self, memo):
        # A ContextVar cannot be copied; a copied model gets its own router (no ids in flight).
        router = UserRouter(self.num_users)
        router.sparse_grads, router.host_tables = self.sparse_grads, self.host_tables
        return router

    def current(self) -> torch.Tensor | None:
        return self._ids.get()

    def one_user(self) -> int | None:
        """The id of the only user of this no-grad forward, if it holds one (``route``)."""
        return self._one.get() if self.base_row is None else None

    def checkpoint_contexts(self):
        """``context_fn`` for non-reentrant ``torch.utils.checkpoint``."""
        ids = self._ids.get()
        return contextlib.nullcontext(), self.route(ids)


class _SparseRows(torch.autograd.Function):
    """``table[ids]`` whose gradient is row-sparse: a COO tensor holding only the batch's rows.

    A dense gradient of an ``[N, ...]`` table costs O(N) memory traffic every step however few
    users the batch holds; this one costs O(batch). ``PersonalAdamW`` then updates only those
    rows (lazy Adam).
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.shape = table.shape
        return table[ids]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        sparse = torch.sparse_coo_tensor(
            ids.unsqueeze(0), grad, ctx.shape, check_invariants=False
        )  # ids are in range: the router checked them
        return sparse, None


def _kaiming_(t: torch.Tensor) -> torch.Tensor:
    # The initialisation nn.Linear and PEFT use for A; fan_in is the last dimension.
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class _UserTables(nn.Module):
    """What every layer with per-user tables shares: gathering the batch's rows and keeping the
    tables in host memory when the router says so."""

    _TABLES = ("user_A", "user_B", "user_C", "user_d", "user_W")
    router: UserRouter
    is_head = False  # the head method's per-user score head (sharelora.head), not a LoRA layer

    @property
    def user_parameters(self) -> dict[str, nn.Parameter]:
        """The per-user tables of this layer, by attribute name (first dim is the user)."""
        return {n: getattr(self, n) for n in self._TABLES if hasattr(self, n)}

    def _rows(self, table: nn.Parameter, ids: torch.Tensor) -> torch.Tensor:
        """The batch's rows of a per-user table ``[b, ...]``, on the batch's device: a table
        kept in host memory sends only these rows (and their gradient comes back the same
        way)."""
        device = ids.device
        ids = ids.to(table.device)
        base = self.router.base_row
        if base is not None:  # T_u = T̄ + Δ_u: the population's row rides along, once
            ids = torch.cat([ids, ids.new_tensor([base])])
        if self.router.sparse_grads and torch.is_grad_enabled() and table.requires_grad:
            rows = _SparseRows.apply(table, ids)
        else:
            rows = table[ids]
        if base is not None:
            rows, center = rows[:-1], rows[-1:] / self.router.base_scale
            own = (ids[:-1] == base).view(-1, *[1] * (rows.dim() - 1))
            # The population's row is T̄ alone, and T̄ learns from its own pairs only: a user's
            # pair moves Δ_u, so T̄ sees each pair once per epoch, as a shared model would.
            rows = rows.masked_fill(own, 0) + torch.where(own, center, center.detach())
        return rows.to(device, non_blocking=True)

    def deviation_sq(
        self, ids: torch.Tensor, center: dict[str, torch.Tensor], weights: bool = False
    ) -> torch.Tensor:
        """``|Δ_u|²`` ``[k]`` of users ``ids`` ``[k]`` from the population rows ``center``
        (``{table name: [1, ...]}``): summed over this layer's per-user tables. ``weights``
        changes nothing here: a head offset is its own weight change."""
        total = torch.zeros(len(ids), device=ids.device)
        for name, table in self.user_parameters.items():
            rows = self._rows(table, ids)  # [k, ...]
            total = total + (rows - center[name].to(rows)).pow(2).flatten(1).sum(1)
        return total

    def _apply(self, fn, recurse: bool = True):
        # With host tables, moving the model (.to, .cuda, accelerate's prepare) moves every
        # tensor but the per-user tables, which are bounded by host memory, not the device's.
        if not self.router.host_tables:
            return super()._apply(fn, recurse)
        order = list(self._parameters)
        kept = {n: self._parameters.pop(n) for n in self.user_parameters}
        try:
            return super()._apply(fn, recurse)
        finally:
            moved = self._parameters
            self._parameters = type(moved)((n, kept.get(n, moved.get(n))) for n in order)

    def _user_ids(self, x: torch.Tensor) -> torch.Tensor:
        """This call's user ids, checked against the batch ``x`` and moved to its device."""
        ids = self.router.current()
        if ids is None:
            raise ValueError(
                f"method {self.method!r} is personalized: pass user_ids=[batch] to the "
                "model's forward"
            )
        if ids.shape[0] != x.shape[0]:
            raise ValueError(
                f"user_ids has {ids.shape[0]} entries but the batch has {x.shape[0]} rows; "
                "give one user id per row (chosen and rejected rows each need theirs)"
            )
        return ids.to(x.device)


class _Mixer:
    """What a method puts between A and B (``MethodSpec.mixer``): nothing here. A mixer owns
    one per-user table, applies it in the forward pass and folds it into A for exports and
    the weight prior, so the layer never branches on the method."""

    table: str | None = None

    def identity(self, n: int, r: int, kw: dict) -> torch.Tensor:
        raise NotImplementedError

    def mix(self, z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return z

    def fold(self, a: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return a


class _Core(_Mixer):
    """``B C_u A``: an ``r × r`` core per user, starting at the identity."""

    table = "user_C"

    def identity(self, n, r, kw):
        return torch.eye(r, **kw).expand(n, r, r).clone()  # [N, r, r]

    def mix(self, z, rows):
        return torch.bmm(z, rows.transpose(1, 2))  # [b,T,r] x [b,r,r]

    def fold(self, a, rows):
        return rows @ a  # [k, r, r] x [k, r, in]


class _Diag(_Mixer):
    """``B diag(d_u) A``: r scales per user, starting at one."""

    table = "user_d"

    def identity(self, n, r, kw):
        return torch.ones(n, r, **kw)  # [N, r]

    def mix(self, z, rows):
        return z * rows.unsqueeze(1)  # [b,T,r] * [b,1,r]

    def fold(self, a, rows):
        return rows.unsqueeze(2) * a  # [k, r, 1] * [k, r, in]


MIXERS: dict[str | None, _Mixer] = {None: _Mixer(), "core": _Core(), "diag": _Diag()}


class PersonalLoRALayer(_UserTables):
    """Wraps a frozen ``nn.Linear`` or transformers ``Conv1D`` with per-user low-rank updates.

    Args:
        base_layer: the layer to adapt; its weight is ``[out, in]`` (Linear) or ``[in, out]``
            (Conv1D, GPT-2's layout).
        config: the adapter configuration.
        num_users: ``N``, rows of every per-user table.
        router: supplies the batch's user ids at forward time.

    Parameters (present depending on the method):
        lora_A ``[r, in]``, lora_B ``[out, r]`` shared;
        user_A ``[N, r, in]``, user_B ``[N, out, r]``, user_C ``[N, r, r]``, user_d ``[N, r]``.

    B (or B_u) starts at zero, so the adapted model equals the backbone at step 0; C_u starts at
    the identity and d_u at one, so the first step moves B and every later step moves them all.
    """

    def __init__(
        self, base_layer: nn.Module, config: AdapterConfig, num_users: int, router: UserRouter
    ):
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, Conv1D)):
            raise TypeError(f"can only adapt nn.Linear or Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        weight = base_layer.weight
        in_f, out_f = weight.shape if self.fan_in_fan_out else weight.shape[::-1]
        self.in_features, self.out_features = in_f, out_f
        self.method = config.method
        self.rank = r = config.rank
        self.scale = config.scale
        self.router = router
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

        self.spec = spec = METHODS[config.method]
        self.mixer = MIXERS[spec.mixer]
        # Adapters train in fp32 (or fp64 in exactness tests) whatever the backbone's dtype.
        kw = {"device": weight.device, "dtype": weight.dtype}
        if weight.dtype not in (torch.float32, torch.float64):
            kw["dtype"] = torch.float32
        independent = config.user_init == "independent"
        if "A" in spec.per_user:
            self.user_A = nn.Parameter(self._user_table(num_users, (r, in_f), kw, independent))
        else:
            self.lora_A = nn.Parameter(_kaiming_(torch.empty(r, in_f, **kw)))
        if "B" in spec.per_user:
            self.user_B = nn.Parameter(torch.zeros(num_users, out_f, r, **kw))
        else:
            self.lora_B = nn.Parameter(torch.zeros(out_f, r, **kw))
        if self.mixer.table:
            setattr(self, self.mixer.table, nn.Parameter(self.mixer.identity(num_users, r, kw)))
        self.personal = bool(self.user_parameters)
        base_layer.requires_grad_(False)

    @staticmethod
    def _user_table(n: int, shape: tuple, kw: dict, independent: bool) -> torch.Tensor:
        if independent:
            return _kaiming_(torch.empty(n, *shape, **kw).view(n * shape[0], shape[1])).view(
                n, *shape
            )
        return _kaiming_(torch.empty(*shape, **kw)).expand(n, *shape).clone()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        ids = self._user_ids(x) if self.personal else None
        lead = x.shape[:-1]
        h = self.dropout(x).to(self._dtype).reshape(x.shape[0], -1, self.in_features)  # [b,T,in]
        z = self._through(h, "A", ids)  # [b,T,in] -> [b,T,r]
        if self.mixer.table:
            z = self.mixer.mix(z, self._rows(getattr(self, self.mixer.table), ids))  # [b,T,r]
        delta = self._through(z, "B", ids)  # [b,T,r] -> [b,T,out]
        return out + (delta * self.scale).reshape(*lead, self.out_features).to(out.dtype)

    def _through(self, h: torch.Tensor, key: str, ids: torch.Tensor | None) -> torch.Tensor:
        """``h [b,T,d]`` through factor ``key`` (``A`` or ``B``): each row's own with a gathered
        ``bmm`` when users own it, else one shared ``matmul``."""
        table = getattr(self, f"user_{key}", None)
        if table is None:
            return h @ getattr(self, f"lora_{key}").T
        one = self.router.one_user()
        if one is not None:  # every row is this user's: their factor, shared by the batch
            return h @ table[one].to(h.device, non_blocking=True).T  # [b,T,d] x [d,k]
        return torch.bmm(h, self._rows(table, ids).transpose(1, 2))  # [b,T,d] x [b,d,k]

    def _factors(self, rows: dict[str, torch.Tensor], k: int):
        """``(A_eff [k, r, in], B [k, out, r])`` from per-user rows ``{table name: [k, ...]}``
        (the mixer folded into A); shared factors are detached, so a prior on the weight change
        never shrinks what every user shares."""
        a, b = (
            rows[f"user_{key}"]
            if f"user_{key}" in rows
            else getattr(self, f"lora_{key}").detach().expand(k, -1, -1)
            for key in ("A", "B")
        )
        if self.mixer.table:
            a = self.mixer.fold(a, rows[self.mixer.table])
        return a, b

    def deviation_sq(
        self, ids: torch.Tensor, center: dict[str, torch.Tensor], weights: bool = False
    ) -> torch.Tensor:
        """With ``weights``: ``|s (B_u A_u − B̄ Ā)|²_F`` ``[k]``, the change of this layer's
        weight between each user and the population (rows ``center``, the shared factors as
        they are now), through ``2r × 2r`` Gram matrices: never an ``[out, in]`` tensor."""
        if not weights or not self.user_parameters:
            return super().deviation_sq(ids, center)
        rows = {n: self._rows(t, ids) for n, t in self.user_parameters.items()}
        a, b = self._factors(rows, len(ids))  # [k, r, in], [k, out, r]
        a0, b0 = self._factors({n: center[n].to(rows[n]) for n in rows}, 1)  # [1, r, in], ...
        # ΔW = P Q with P = [B_u, −B̄] [k, out, 2r] and Q = [A_u; Ā] [k, 2r, in], so
        # |ΔW|² = tr(PᵀP QQᵀ) = Σ (PᵀP ⊙ QQᵀ): both Grams are symmetric.
        p = torch.cat([b, -b0.expand_as(b)], dim=2)
        q = torch.cat([a, a0.expand_as(a)], dim=1)
        gram = (p.transpose(1, 2) @ p) * (q @ q.transpose(1, 2))  # [k, 2r, 2r]
        return self.scale**2 * gram.flatten(1).sum(1)

    @property
    def _dtype(self) -> torch.dtype:
        return next(iter(self.parameters(recurse=False))).dtype

    def effective_factors(self, user_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_eff [r, in], B_eff [out, r])`` with ``ΔW_u = scale * B_eff @ A_eff``.

        The factors a plain LoRA (PEFT) adapter for this user holds: core folds ``C_u`` into A,
        diag folds ``diag(d_u)`` into A.
        """
        if user_id is None and self.method != "shared":
            raise ValueError(f"method {self.method!r} needs a user id for its factors")
        rows = {n: t[user_id : user_id + 1] for n, t in self.user_parameters.items()}  # [1, ...]
        a, b = self._factors(rows, 1)  # [1, r, in], [1, out, r]
        return a[0].detach(), b[0].detach()

    def delta_weight(self, user_id: int | None) -> torch.Tensor:
        """``ΔW_u = scale * B_eff @ A_eff`` in the base layer's layout (Conv1D: ``[in, out]``)."""
        a, b = self.effective_factors(user_id)
        delta = self.scale * (b @ a)  # [out, in]
        return delta.T if self.fan_in_fan_out else delta

    def merged_base(self, user_id: int | None) -> nn.Module:
        """A plain copy of the base layer with ``W0 + ΔW_u`` fused in; the original is untouched."""
        layer = copy.deepcopy(self.base_layer)
        w = layer.weight
        w.data = (w.data.to(self._dtype) + self.delta_weight(user_id)).to(w.dtype)
        return layer

    def extra_repr(self) -> str:
        return (
            f"method={self.method}, in={self.in_features}, out={self.out_features}, "
            f"r={self.rank}, scale={self.scale:g}"
        )

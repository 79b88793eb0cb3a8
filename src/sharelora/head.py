"""The ``head`` method's per-user score head: ``r_u(x, y) = (w̄ + δ_u) · h(x, y) + b``.

The cheapest personalization: ``h`` is the (shared-LoRA-adapted) backbone's feature that its
score head reads (BERT's pooled first token, a decoder's last token), ``w̄`` is that head's
weight, shared and trained as in every method, and ``δ_u`` is one row of ``hidden`` numbers per
user (384 on MiniLM, 4,096 on an 8B model). It is the per-user linear reward over shared reward
features of the LoRe / P-RLHF family, with signed weights: a user may want the opposite of
another.

The offset is not a child of the backbone: it reaches the head through a forward hook, so the
head keeps its checkpoint's parameter names in every method (a ``shared`` model's head loads
into a ``head`` model unchanged) and a merged export is a plain head with ``w̄ + δ_u``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .adapters import UserRouter, _UserTables


class PersonalHead(_UserTables):
    """Adds ``δ_u · h`` to the output of the backbone's score head ``nn.Linear(hidden, 1)``.

    Args:
        head: the backbone's score head (``classifier``, ``score``); it stays where it is.
        num_users: ``N``, rows of ``user_W``.
        router: supplies the batch's user ids at forward time.
        method: the adapter method's name, for error messages.

    Parameters:
        user_W ``[N, out, hidden]``: ``δ_u`` in the head's weight layout, zero at the start so
        the model equals its population.
    """

    is_head = True
    fan_in_fan_out = False

    def __init__(self, head: nn.Module, num_users: int, router: UserRouter, method: str):
        super().__init__()
        if not isinstance(head, nn.Linear):
            raise TypeError(f"the head method needs a linear score head, got {type(head).__name__}")
        self._head = [head]  # a list: not a submodule, its parameters belong to the backbone
        self.router, self.method = router, method
        self.in_features, self.out_features = head.in_features, head.out_features
        dtype = head.weight.dtype
        if dtype not in (torch.float32, torch.float64):
            dtype = torch.float32  # per-user rows train in fp32 whatever the backbone's dtype
        self.user_W = nn.Parameter(
            torch.zeros(
                num_users,
                self.out_features,
                self.in_features,
                dtype=dtype,
                device=head.weight.device,
            )
        )
        self._hook = head.register_forward_hook(self._add_offset)

    def _add_offset(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]  # [b, ..., hidden]: [b, hidden] for BERT, [b, T, hidden] for decoders
        ids = self._user_ids(x)
        h = x.to(self.user_W.dtype).reshape(x.shape[0], -1, self.in_features)  # [b, T, hidden]
        rows = self._rows(self.user_W, ids)  # [b, out, hidden]
        delta = torch.bmm(h, rows.transpose(1, 2))  # [b, T, hidden] x [b, hidden, out]
        return output + delta.reshape(*x.shape[:-1], self.out_features).to(output.dtype)

    def delta_weight(self, user_id: int) -> torch.Tensor:
        """``δ_u`` ``[out, hidden]``, in the head's weight layout."""
        return self.user_W[user_id].detach()

    def merged_base(self, user_id: int) -> nn.Linear:
        """A plain head with weight ``w̄ + δ_u`` (and no hook); the original is untouched."""
        head = self._head[0]
        w = head.weight
        plain = nn.Linear(
            self.in_features,
            self.out_features,
            bias=head.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            plain.weight.copy_((w.to(self.user_W.dtype) + self.delta_weight(user_id)).to(w.dtype))
            if head.bias is not None:
                plain.bias.copy_(head.bias)
        return plain

    def extra_repr(self) -> str:
        return f"method={self.method}, hidden={self.in_features}, out={self.out_features}"

"""ETHER+ (Bini et al., ICML 2024, arXiv 2405.20271) with a signed coefficient; not in peft.

ETHER+ multiplies a frozen Linear weight by ``H = I - P_u + P_v`` (``P_x = x xᵀ/‖x‖²``),
block-diagonal with ``n_blocks`` blocks, each with its own (u, v). Signed:

    H(c) = I + c·(P_v - P_u)        per block; H(0) = I, H(1) = ETHER+

applied to the input (``side: in``, ``W H(c)``, the paper code's default) or to the output
(``side: out``, ``H(c) W``; the bias is left as is, as in the paper). Per token this is
``y + c·(v̂(v̂·y) - û(û·y))``: O(d), no dense matrix, and any per-example coefficient.

H(c) is a **first-order mirror, not an exact inverse**: ``H(c)H(-c) = I - c²D²`` with
``D = P_v - P_u`` (D has eigenvalues ±sin φ, φ the angle between u and v). So ``-c`` undoes
``+c`` only up to O(c²·sin²φ); the orthogonal kinds (boft, oft, road) are exact inverses.
Init ``v = -u``: D = 0, the adapter starts at the identity and is not stuck there (the
gradients of u and v are non-zero and equal).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .. import hidden
from ..config import AdapterConfig, EtherOptions
from .base import Adapter, param_key as _key


class EtherAdapter(Adapter):
    kind = "ether"
    param_prefixes = ("ether_",)
    options = EtherOptions
    per_example = True

    def __init__(self, model, adapter_cfg: AdapterConfig, targets: list[str], dims: list[int]):
        super().__init__(model, adapter_cfg)
        self.targets = list(targets)
        n = adapter_cfg.ether.n_blocks
        us = {_key(t): torch.randn(n, d // n) / (d // n) ** 0.5 for t, d in zip(targets, dims)}
        self.ether_u = nn.ParameterDict({k: nn.Parameter(u.clone()) for k, u in us.items()})
        self.ether_v = nn.ParameterDict({k: nn.Parameter(-u) for k, u in us.items()})

    @classmethod
    def attach(cls, model, adapter_cfg: AdapterConfig, directions=None):
        targets = hidden.resolve(model, adapter_cfg.targets, adapter_cfg.depth)
        dims = []
        for t in targets:
            mod = hidden.get_module(model, t)
            if not isinstance(mod, nn.Linear):
                raise ValueError(f"adapter kind 'ether' needs Linear modules; {t!r} is a {type(mod).__name__}. "
                                 "Use patterns such as model.layers.{N}.mlp.down_proj")
            d = mod.in_features if adapter_cfg.ether.side == "in" else mod.out_features
            if d % adapter_cfg.ether.n_blocks:
                raise ValueError(f"adapter.ether.n_blocks {adapter_cfg.ether.n_blocks} does not divide the "
                                 f"{adapter_cfg.ether.side}put size {d} of {t!r}; choose a divisor of {d}")
            dims.append(d)
        param = next(model.parameters())
        adapter = cls(model, adapter_cfg, targets, dims).to(param.device)
        adapter.bind(model)
        adapter.edit_modules(targets, "input" if adapter_cfg.ether.side == "in" else "output")
        return model, adapter

    def trainable_parameters(self):
        return list(self.ether_u.values()) + list(self.ether_v.values())

    def state_tensors(self):
        out = {}
        for t in self.targets:
            out[f"ether_u.{_key(t)}"] = self.ether_u[_key(t)]
            out[f"ether_v.{_key(t)}"] = self.ether_v[_key(t)]
        return out

    def load_state_tensors(self, tensors):
        self._check_keys(tensors)
        with torch.no_grad():
            for name, p in self.state_tensors().items():
                p.copy_(tensors[name])

    def reflect(self, name: str, y: torch.Tensor, c) -> torch.Tensor:
        """``H(c) y`` blockwise along the last dimension of ``y``."""
        u = F.normalize(self.ether_u[_key(name)], dim=-1, eps=1e-8)
        v = F.normalize(self.ether_v[_key(name)], dim=-1, eps=1e-8)
        yb = y.unflatten(-1, u.shape).float()
        d = v * (yb * v).sum(-1, keepdim=True) - u * (yb * u).sum(-1, keepdim=True)
        if torch.is_tensor(c) and c.dim() == 1:  # one coefficient per batch row
            c = c.view(-1, *([1] * (yb.dim() - 1)))
        return y + (c * d).flatten(-2).to(y.dtype)

    def edit(self, module: nn.Module, name: str, y: torch.Tensor, c) -> torch.Tensor:
        """``H(c)`` on the module's input x, or on its output ``W x`` (the bias kept outside)."""
        bias = module.bias
        if self.config.ether.side == "out" and bias is not None:  # H(c)·(W x) + b
            return self.reflect(name, y - bias, c) + bias
        return self.reflect(name, y, c)

    @torch.no_grad()
    def matrix(self, name: str, c: float) -> torch.Tensor:
        """The dense block-diagonal H(c) of one module (for merging and checks)."""
        n, b = self.ether_u[_key(name)].shape
        return self.reflect(name, torch.eye(n * b, device=self.ether_u[_key(name)].device), c)

    @torch.no_grad()
    def merge_into(self, target: nn.Module, c: float) -> None:
        for t in self.targets:
            lin = hidden.get_module(target, t)
            H = self.matrix(t, c).to(lin.weight.device)  # symmetric
            w = lin.weight.data.float()
            lin.weight.data.copy_((H @ w if self.config.ether.side == "out" else w @ H).to(lin.weight.dtype))

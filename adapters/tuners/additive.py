"""Additive steering vectors: ``h_l <- h_l + c * w_l`` on the output of each chosen module.

An exact mirror: ``f(-c)`` subtracts what ``f(c)`` adds. Exported later as a llama.cpp
control vector. Note that a vector added to both members of a pair cancels in
``h_pos - h_neg`` at its own layer; it acts on the contrast only through later layers.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import hidden
from ..config import AdapterConfig, AdditiveOptions
from .base import Adapter, param_key as _key


class AdditiveAdapter(Adapter):
    kind = "additive"
    param_prefixes = ("additive_",)
    options = AdditiveOptions
    quantizable = True
    exact_inverse = True
    per_example = True

    def __init__(self, model, adapter_cfg: AdapterConfig, targets: list[str], dim: int):
        super().__init__(model, adapter_cfg)
        self.targets = list(targets)
        self.additive_vectors = nn.ParameterDict(
            {_key(n): nn.Parameter(torch.zeros(dim, dtype=torch.float32)) for n in self.targets})

    @classmethod
    def attach(cls, model, adapter_cfg: AdapterConfig, directions=None):
        layers = hidden.resolve(model, adapter_cfg.targets, adapter_cfg.depth)
        dim = hidden.output_dim(model, layers[0])
        adapter = cls(model, adapter_cfg, layers, dim).to(next(model.parameters()).device)
        if adapter_cfg.additive.init == "directions":
            if directions is None:
                raise ValueError("adapter.additive.init=directions needs reference directions")
            adapter.init_from(directions)
        adapter.bind(model)
        adapter.edit_modules(adapter.targets, "output")
        return model, adapter

    @torch.no_grad()
    def init_from(self, directions) -> None:
        """Start each vector at the reference direction times its separation scale (where known)."""
        for name in self.targets:
            if name in directions.vectors:
                self.additive_vectors[_key(name)].copy_(directions.vectors[name][0] * directions.scale[name])

    def vector(self, name: str) -> torch.Tensor:
        return self.additive_vectors[_key(name)]

    def trainable_parameters(self):
        return list(self.additive_vectors.values())

    def state_tensors(self):
        return {f"additive_vectors.{_key(n)}": self.vector(n) for n in self.targets}

    def load_state_tensors(self, tensors):
        self._check_keys(tensors)
        with torch.no_grad():
            for n in self.targets:
                self.vector(n).copy_(tensors[f"additive_vectors.{_key(n)}"])

    def edit(self, module: nn.Module, name: str, h: torch.Tensor, c) -> torch.Tensor:
        """``h + c · w`` on the module's output (B, T, D)."""
        coeff = c.view(-1, *([1] * (h.dim() - 1))) if torch.is_tensor(c) and c.dim() == 1 else c
        return h + (coeff * self.vector(name)).to(h.dtype)

    @torch.no_grad()
    def merge_into(self, target, c):
        """``h + c·w`` becomes a bias on the Linear that produces ``h`` (a decoder layer's
        residual output -> its mlp.down_proj). A model without biases there needs its config
        flag (Llama's ``mlp_bias`` / ``attention_bias``), which adds zero biases to the family."""
        for name in self.targets:
            lin_name = _producer(target, name)
            lin = hidden.get_module(target, lin_name)
            if lin.bias is None:
                _enable_biases(target, lin_name)
            lin.bias.add_((c * self.vector(name).detach()).to(lin.bias.dtype))


def _producer(model, name: str) -> str:
    """The Linear whose output is (added to) the output of module ``name``."""
    modules = dict(hidden.base_model_of(model).named_modules())
    if isinstance(modules.get(name), nn.Linear):
        return name
    last = name.rsplit(".", 1)[-1]
    candidates = {"mlp": f"{name}.down_proj", "self_attn": f"{name}.o_proj"}
    lin = candidates.get(last, f"{name}.mlp.down_proj" if last.isdigit() else None)
    if not isinstance(modules.get(lin), nn.Linear):
        raise ValueError(f"cannot merge an additive vector on {name!r} into weights: no Linear produces its "
                         "output (supported: decoder layers model.layers.{N}, .mlp, .self_attn and Linear "
                         "modules). Export it as a control vector instead")
    return lin


def _enable_biases(model, lin_name: str) -> None:
    family, flag = (".mlp.", "mlp_bias") if ".mlp." in lin_name else (".self_attn.", "attention_bias")
    cfg = hidden.base_model_of(model).config
    if family not in lin_name or not hasattr(cfg, flag):
        raise ValueError(f"cannot merge an additive vector into {lin_name!r}: it has no bias and the "
                         f"{type(cfg).__name__} has no {flag} option to add one. Export the adapter as a "
                         "llama.cpp control vector (adapters.export.control_vector) instead")
    setattr(cfg, flag, True)
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and family in n and m.bias is None:
            m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device),
                                  requires_grad=False)

"""Additive steering vectors: ``h_l <- h_l + c * w_l`` on the output of each chosen module.

An exact mirror: ``f(-c)`` subtracts what ``f(c)`` adds. Exported later as a llama.cpp
control vector. Note that a vector added to both members of a pair cancels in
``h_pos - h_neg`` at its own layer; it acts on the contrast only through later layers.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .. import hidden
from .base import Adapter


def _key(name: str) -> str:
    return name.replace(".", "__")


class AdditiveAdapter(Adapter):
    kind = "additive"
    param_prefixes = ("additive_",)

    def __init__(self, model, cfg, layers: list[str], dim: int):
        super().__init__(model, cfg)
        self.layers = list(layers)
        self.additive_vectors = nn.ParameterDict(
            {_key(n): nn.Parameter(torch.zeros(dim, dtype=torch.float32)) for n in self.layers})

    @classmethod
    def attach(cls, model, cfg, directions=None):
        layers = hidden.resolve(model, cfg.layers, cfg.depth)
        dim = hidden.output_dim(model, layers[0])
        adapter = cls(model, cfg, layers, dim).to(next(model.parameters()).device)
        if getattr(cfg, "init", "zeros") == "directions":
            if directions is None:
                raise ValueError("adapter.init=directions needs reference directions")
            adapter.init_from(directions)
        adapter.bind(model)
        return model, adapter

    @torch.no_grad()
    def init_from(self, directions) -> None:
        """Start each vector at the reference direction times its separation scale (where known)."""
        for name in self.layers:
            if name in directions.vectors:
                self.additive_vectors[_key(name)].copy_(directions.vectors[name][0] * directions.scale[name])

    def vector(self, name: str) -> torch.Tensor:
        return self.additive_vectors[_key(name)]

    def trainable_parameters(self):
        return list(self.additive_vectors.values())

    def state_tensors(self):
        return {f"additive_vectors.{_key(n)}": self.vector(n) for n in self.layers}

    def load_state_tensors(self, tensors):
        self._check_keys(tensors)
        with torch.no_grad():
            for n in self.layers:
                self.vector(n).copy_(tensors[f"additive_vectors.{_key(n)}"])

    @contextlib.contextmanager
    def apply(self, c):
        def add(name):
            def fn(h):  # (B, T, D)
                coeff = c.view(-1, *([1] * (h.dim() - 1))) if torch.is_tensor(c) and c.dim() == 1 else c
                return h + (coeff * self.vector(name)).to(h.dtype)

            return fn

        with hidden.hooks(self.model, {n: add(n) for n in self.layers}):
            yield

"""What every peft-backed kind shares: attach through ``get_peft_model``, peft's own state
dict, the disabled (exact base) path for c = 0, merging at a coefficient, and the per-forward
parameter swap that gives kinds without a scale (BOFT, OFT, RoAd) a signed coefficient.

The swap (docs/peft.md): a forward pre-hook on each tuner layer replaces
``container._parameters[key]`` by ``f(param, c)``, computed from the real Parameter at every
call, so autograd reaches it and optimiser updates are picked up; a forward hook with
``always_call=True`` puts the Parameter back, even when the forward raises. peft's forward
is reused unchanged.

Outside ``steer`` every kind computes the base model: peft's layers are attached disabled
(``_disable_adapters``, the flag behind ``disable_adapter()``; requires_grad is left alone)
and enabled only inside ``apply``.
"""

from __future__ import annotations

import abc
import contextlib
import copy
from typing import Callable

import torch
from torch import nn

from .. import hidden
from ..config import AdapterConfig
from .base import Adapter

ADAPTER_NAME = "default"

# (container holding the tensor, key in its _parameters, transform(param, c) -> tensor)
Swap = tuple[nn.Module, str, Callable[[torch.Tensor, object], torch.Tensor]]


def scaled(x: torch.Tensor, c) -> torch.Tensor:
    """``c · x``: for parameters the adapted function is odd in (a Cayley generator, an angle)."""
    return x * c


def positive_power(x: torch.Tensor, c, eps: float = 1e-4) -> torch.Tensor:
    """``x ** c`` for a multiplicative factor that should stay positive (BOFT's s, RoAd's α).

    A factor that training pushed below ``eps`` is clamped there: ``x ** c`` of a negative
    number is NaN for fractional c. At c = ±1 and factors > eps this is exactly x and 1/x.
    """
    return x.clamp_min(eps) ** c


class PeftAdapter(Adapter):
    """Base of the peft kinds. A subclass sets ``kind``, ``param_prefixes``,
    ``layer_class_path`` (the peft tuner-layer class) and implements ``peft_config`` and
    ``at`` (the layer's function at coefficient c, as a context manager)."""

    layer_class_path: tuple[str, str] = ("", "")

    @classmethod
    @abc.abstractmethod
    def peft_config(cls, adapter_cfg: AdapterConfig, targets: list[str]):
        """The peft config that adds this kind to ``targets``."""

    @classmethod
    def check_target(cls, name: str, module: nn.Module, adapter_cfg: AdapterConfig) -> None:
        """Raise ValueError (naming the module and the fix) if this kind cannot adapt it."""
        if not isinstance(module, nn.Linear):
            raise ValueError(f"adapter kind {cls.kind!r} needs Linear modules; {name!r} is a "
                             f"{type(module).__name__}. Use patterns such as "
                             "model.layers.{N}.self_attn.o_proj or model.layers.{N}.mlp.down_proj")

    @classmethod
    def attach(cls, model, adapter_cfg: AdapterConfig, directions=None):
        from peft import get_peft_model

        targets = hidden.resolve(model, adapter_cfg.targets, adapter_cfg.depth)
        for t in targets:
            cls.check_target(t, hidden.get_module(model, t), adapter_cfg)
        peft_model = get_peft_model(model, cls.peft_config(adapter_cfg, targets), adapter_name=ADAPTER_NAME)
        for n, p in peft_model.named_parameters():
            p.requires_grad_(cls._is_own(n))
        adapter = cls(peft_model, adapter_cfg)
        adapter.targets = targets
        adapter.bind(peft_model)
        adapter._set_enabled(False)
        return peft_model, adapter

    def _set_enabled(self, on: bool) -> None:
        for layer in self.tuner_layers().values():
            layer._disable_adapters = not on

    @classmethod
    def _is_own(cls, name: str) -> bool:
        return any(part.startswith(cls.param_prefixes) for part in name.split("."))

    @classmethod
    def layer_class(cls):
        import importlib

        module, name = cls.layer_class_path
        return getattr(importlib.import_module(module), name)

    def tuner_layers(self) -> dict[str, nn.Module]:
        """The peft tuner layers by the base model's module name."""
        layer_cls = self.layer_class()
        base = hidden.base_model_of(self.model)
        return {n: m for n, m in base.named_modules() if isinstance(m, layer_cls)}

    def trainable_parameters(self):
        return [p for n, p in self.model.named_parameters() if self._is_own(n)]

    def state_tensors(self):
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model, adapter_name=ADAPTER_NAME)

    def load_state_tensors(self, tensors):
        from peft import set_peft_model_state_dict

        self._check_keys(tensors)
        result = set_peft_model_state_dict(self.model, tensors, adapter_name=ADAPTER_NAME)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"{self.kind} adapter file holds keys this model lacks: {unexpected[:5]}")

    # -- the coefficient -------------------------------------------------------------------

    @abc.abstractmethod
    def at(self, layer: nn.Module, c) -> contextlib.AbstractContextManager:
        """The tuner layer computes its function at coefficient c inside the block (used
        directly for merging, and around each forward call by ``coefficient``)."""

    @contextlib.contextmanager
    def apply(self, c):
        self._set_enabled(True)
        try:
            with self.coefficient(c):
                yield
        finally:
            self._set_enabled(False)

    @contextlib.contextmanager
    def coefficient(self, c):
        """Every tuner layer at coefficient c: ``at`` entered around each layer's forward."""
        handles, open_ctx = [], {}

        def pre(mod, _args):
            ctx = self.at(mod, c)
            ctx.__enter__()
            open_ctx[id(mod)] = ctx

        def post(mod, _args, _out):
            ctx = open_ctx.pop(id(mod), None)
            if ctx is not None:
                ctx.__exit__(None, None, None)

        try:
            for layer in self.tuner_layers().values():
                handles.append(layer.register_forward_pre_hook(pre))
                handles.append(layer.register_forward_hook(post, always_call=True))
            yield
        finally:
            for h in handles:
                h.remove()
            for ctx in open_ctx.values():
                ctx.__exit__(None, None, None)

    # -- merging ---------------------------------------------------------------------------

    @torch.no_grad()
    def merge_into(self, target: nn.Module, c: float) -> None:
        """Apply the adapter at coefficient ``c`` to the weights currently in ``target`` (a
        plain model with the base's module names), with peft's own ``merge`` on a copy of
        each tuner layer; nothing of this model is written."""
        for name, layer in self.tuner_layers().items():
            dest = hidden.get_module(target, name)
            work = copy.deepcopy(layer)
            base = work.get_base_layer()
            base.weight.data = dest.weight.data.detach().clone().to(base.weight.dtype)
            if dest.bias is not None:
                base.bias.data = dest.bias.data.detach().clone().to(base.bias.dtype)
            with self.at(work, c):
                work.merge(adapter_names=[ADAPTER_NAME])
            dest.weight.data.copy_(base.weight.data)
            if dest.bias is not None:
                dest.bias.data.copy_(base.bias.data)


class SwapAdapter(PeftAdapter):
    """Kinds without a peft scale (BOFT, OFT, RoAd): ``at`` swaps the tensors named by
    ``swaps`` for f(param, c) and puts the Parameters back on exit."""

    @abc.abstractmethod
    def swaps(self, layer: nn.Module) -> list[Swap]:
        """Which tensors of ``layer`` to replace by f(param, c)."""

    @contextlib.contextmanager
    def at(self, layer: nn.Module, c):
        swaps = self.swaps(layer)
        saved = [(box, key, box._parameters[key]) for box, key, _ in swaps]
        try:
            for box, key, fn in swaps:
                box._parameters[key] = fn(box._parameters[key], c)
            yield
        finally:
            for box, key, param in saved:
                box._parameters[key] = param

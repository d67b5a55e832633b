"""The contract every adapter kind implements.

* ``apply(c)`` (c != 0) makes the model compute the adapted function at coefficient ``c``;
  ``c`` enters the forward as a multiplication inside the autograd graph, so gradients
  reach the adapter's real parameters. ``off()`` gives exactly the base model.
* Only the adapter's parameters are trainable; base tensors are never written.
* ``state_tensors`` / ``load_state_tensors`` round-trip the adapter.

Use ``adapters.steer(model, c)``, never these methods directly: ``steer`` validates ``c``,
routes ``c == 0`` to ``off()`` and forbids nesting.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Iterator

import torch
from torch import nn

ATTR = "_contrastive_adapter"


def param_key(module_name: str) -> str:
    """A module name as a ParameterDict key (dots are not allowed there)."""
    return module_name.replace(".", "__")


def attached_adapter(model: nn.Module) -> "Adapter":
    adapter = model.__dict__.get(ATTR)
    if adapter is None:
        raise ValueError("this model has no contrastive adapter attached; load one with "
                         "adapters.load_run(run_dir) or attach one with adapters.tuners.attach")
    return adapter


class Adapter(nn.Module, abc.ABC):
    kind: str = ""
    param_prefixes: tuple[str, ...] = ()
    per_example: bool = False
    """Whether ``apply`` takes a 1-d coefficient (one value per batch row)."""

    def __init__(self, model: nn.Module, cfg):
        super().__init__()
        self.__dict__["model"] = model  # a reference, not a submodule: base params stay out
        self.cfg = cfg
        self.active = False
        self.coeff = None
        """The coefficient of the enclosing ``steer`` block (None outside one, or at c = 0)."""

    def bind(self, model: nn.Module) -> None:
        """Make ``steer(model, c)`` find this adapter, on the model to call and on the plain
        transformers model inside it (where activation checkpointing looks for it)."""
        from ..hidden import base_model_of

        model.__dict__[ATTR] = self
        base_model_of(model).__dict__[ATTR] = self
        self.__dict__["model"] = model

    @classmethod
    @abc.abstractmethod
    def attach(cls, model: nn.Module, cfg, directions=None) -> tuple[nn.Module, "Adapter"]:
        """Attach to ``model``; return (the model to call, the adapter)."""

    @abc.abstractmethod
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapter's parameters (the only ones the optimiser sees)."""

    @abc.abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors to save, by name."""

    @abc.abstractmethod
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load tensors saved by ``state_tensors`` (names and shapes checked)."""

    @abc.abstractmethod
    def apply(self, c) -> contextlib.AbstractContextManager:
        """Context manager: the model computes the adapted function at coefficient ``c != 0``."""

    @abc.abstractmethod
    def merge_into(self, target: nn.Module, c: float) -> None:
        """Write the adapter's function at coefficient ``c`` into the weights of ``target``, a
        plain copy of the base model (same module names); ``adapters.export.merged_model``."""

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        yield

    def steered_modules(self) -> list[str]:
        """The base model's modules whose computation the adapter changes."""
        return list(self.targets)

    def _check_keys(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.state_tensors()
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        bad = [k for k in own if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape)]
        if missing or extra or bad:
            raise ValueError(
                f"{self.kind} adapter file does not fit this adapter: missing {missing[:5]}, "
                f"unexpected {extra[:5]}, wrong shape {[(k, tuple(tensors[k].shape), tuple(own[k].shape)) for k in bad[:5]]}. "
                "Was it saved with a different adapter config or base model?")

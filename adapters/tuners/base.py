"""The contract every adapter kind implements.

* ``apply(c)`` (c != 0) makes the model compute the adapted function at coefficient ``c``;
  ``c`` enters the forward as a multiplication inside the autograd graph, so gradients
  reach the adapter's real parameters. ``off()`` gives exactly the base model.
* Only the adapter's parameters are trainable; base tensors are never written.
* ``state_tensors`` / ``load_state_tensors`` round-trip the adapter.

Use ``adapters.steer(model, c)``, never these methods directly: ``steer`` validates ``c``,
routes ``c == 0`` to ``off()`` and forbids nesting.

Steering is scoped to the thread (the ``contextvars`` context) that entered ``steer``: the
coefficient lives in a ContextVar, and ``apply`` / ``off`` are entered by forward hooks on the
model's entry modules (``bind``) around each forward pass, under a per-adapter lock, for the
coefficient of the context that runs it. Two threads steering one model at different
coefficients each get their own result (their forward passes take turns), and a plain forward
in another thread is the base model.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import threading
from typing import Iterator, NamedTuple

import torch
from torch import nn

from ..config import AdapterConfig
from ..errors import UserError

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


class CoefficientError(UserError):
    """A coefficient that is not a finite number, beyond ``steer.MAX_COEFF``, or one per row for a
    batch of another size."""


class Steering(NamedTuple):
    """The coefficient of one ``steer`` block; ``off``: compute the base model (c == 0)."""
    coeff: object
    off: bool


class Adapter(nn.Module, abc.ABC):
    kind: str = ""
    param_prefixes: tuple[str, ...] = ()
    options: type = type(None)
    """The dataclass of this kind's options: ``AdapterConfig.<kind>`` holds one."""
    per_example: bool = False
    """Whether ``apply`` takes a 1-d coefficient (one value per batch row)."""
    quantizable: bool = False
    """Whether it trains on a 4-bit / 8-bit (bitsandbytes) base; config.QUANTIZED_KINDS lists these."""
    exact_inverse: bool = False
    """Whether, with its default options, merging at -c undoes merging at +c exactly."""

    def __init__(self, model: nn.Module, adapter_cfg: AdapterConfig):
        super().__init__()
        self.__dict__["model"] = model  # a reference, not a submodule: base params stay out
        self.config = adapter_cfg
        self._init_scope()

    def _init_scope(self) -> None:
        # plain attributes (not module state): made fresh for a copy (__setstate__)
        self.__dict__["_steering"] = contextvars.ContextVar(f"steering_{id(self)}", default=None)
        self.__dict__["_lock"] = threading.RLock()
        self.__dict__["_frames"] = threading.local()

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in ("_steering", "_lock", "_frames"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._init_scope()

    @property
    def steering(self) -> Steering | None:
        """This context's ``steer`` block (None outside one)."""
        return self._steering.get()

    @property
    def active(self) -> bool:
        return self._steering.get() is not None

    @property
    def coeff(self):
        """The coefficient of this context's ``steer`` block (None outside one, or at c = 0)."""
        s = self._steering.get()
        return None if s is None or s.off else s.coeff

    def bind(self, model: nn.Module) -> None:
        """Make ``steer(model, c)`` find this adapter, on the model to call and on the plain
        transformers model inside it (where activation checkpointing looks for it). These,
        the decoder stack and each adapted module are entry modules: forward hooks on them
        steer a pass (or a call of the module alone) for the calling context's coefficient."""
        from ..hidden import base_model_of, decoder_stack, get_module

        self.__dict__["model"] = model
        for old in self.__dict__.pop("_handles", []):
            old.remove()
        handles, hosts = [], []
        adapted = [get_module(model, n) for n in self.steered_modules()]
        for host in (model, base_model_of(model), decoder_stack(model), *adapted):
            if host is None or any(host is h for h in hosts):
                continue
            hosts.append(host)
            host.__dict__[ATTR] = self
            handles.append(host.register_forward_pre_hook(_enter_forward, with_kwargs=True))
            handles.append(host.register_forward_hook(_exit_forward, with_kwargs=True, always_call=True))
        self.__dict__["_handles"] = handles

    def detach(self) -> None:
        """Take this adapter's hooks and references off the model (``bind``, ``edit_modules``):
        afterwards the model's forward is the plain base forward again (a peft kind's layers
        are unloaded separately, by ``PeftModel.unload``)."""
        for handle in self.__dict__.pop("_handles", []):
            handle.remove()
        for mod in self.model.modules():
            if mod.__dict__.get(ATTR) is self:
                mod.__dict__.pop(ATTR)
                mod.__dict__.pop(_EDITED, None)

    def edit_modules(self, names: list[str], on: str) -> None:
        """For kinds that edit hidden states (they define ``edit(module, name, h, c)``, the edited
        state at coefficient c): hooks on each named module's output (or first input,
        ``on="input"``) that replace it by ``self.edit(module, name, h, c)`` while the adapter
        is applied. Registered once, here, so they run before any hook registered later (a
        recording of the same module sees the edit), and ``apply`` only sets ``c``."""
        from .. import hidden

        for name in names:
            mod = hidden.get_module(self.model, name)
            mod.__dict__[ATTR], mod.__dict__[_EDITED] = self, name
            if on == "output":  # first: before the entry hook that ends the pass (``bind``)
                self._handles.append(mod.register_forward_hook(_edit_output, prepend=True))
            else:  # after the entry hook that starts it
                self._handles.append(mod.register_forward_pre_hook(_edit_input))

    @contextlib.contextmanager
    def apply(self, c):
        """For kinds that use ``edit_modules``: their hooks edit at coefficient c in the block."""
        self.__dict__["_applied"] = c
        try:
            yield
        finally:
            self.__dict__["_applied"] = None

    @contextlib.contextmanager
    def scoped(self, c) -> Iterator[None]:
        """The model computes coefficient ``c`` (None: the base) inside the block, holding the
        adapter's lock: for a pass that runs outside the hooked entry modules (the recompute of
        activation checkpointing during ``backward``)."""
        with self._lock, (self.off() if c is None else self.apply(c)):
            yield

    @classmethod
    @abc.abstractmethod
    def attach(cls, model: nn.Module, adapter_cfg: AdapterConfig, directions=None) -> tuple[nn.Module, "Adapter"]:
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


def _enter_forward(module: nn.Module, args, kwargs) -> None:
    """Forward pre-hook of an entry module: the outermost one of a pass takes the adapter's
    lock and puts the model at this context's coefficient for the pass."""
    adapter = module.__dict__.get(ATTR)
    if adapter is None:  # a copy whose adapter was removed (export.plain_copy)
        return
    frames = adapter._frames.__dict__.setdefault("stack", [])
    if frames:  # an inner entry module of a pass already steered
        frames.append((module, None))
        return
    state = adapter.steering
    if state is not None and not state.off:
        _check_rows(state.coeff, args, kwargs)
    adapter._lock.acquire()
    try:
        ctx = contextlib.ExitStack()
        ctx.enter_context(adapter.off() if state is None or state.off else adapter.apply(state.coeff))
    except BaseException:
        adapter._lock.release()
        raise
    frames.append((module, ctx))


def _exit_forward(module: nn.Module, args, kwargs, output) -> None:
    """Forward hook (always called, also when the pass raises): undo what ``_enter_forward``
    did for this module, and release the lock after the outermost one."""
    adapter = module.__dict__.get(ATTR)
    frames = getattr(adapter._frames, "stack", None) if adapter is not None else None
    if not frames or frames[-1][0] is not module:  # its pre-hook raised before entering
        return
    _, ctx = frames.pop()
    if ctx is not None:
        try:
            ctx.close()
        finally:
            adapter._lock.release()


_EDITED = "_edited_module"


def _applied(module: nn.Module):
    adapter = module.__dict__.get(ATTR)
    c = None if adapter is None else adapter.__dict__.get("_applied")
    return adapter, c


def _edit_output(module: nn.Module, _args, output):
    adapter, c = _applied(module)
    if c is None:
        return None
    from ..hidden import output_tensor, replace_output

    return replace_output(output, adapter.edit(module, module.__dict__[_EDITED], output_tensor(output), c))


def _edit_input(module: nn.Module, args):
    adapter, c = _applied(module)
    if c is None:
        return None
    return (adapter.edit(module, module.__dict__[_EDITED], args[0], c),) + tuple(args[1:])


def _check_rows(c, args, kwargs) -> None:
    """Per-example coefficients need a batch with one row per coefficient."""
    if not (torch.is_tensor(c) and c.dim() == 1):
        return
    x = next((v for v in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1]) if torch.is_tensor(v)),
             None)
    if x is not None and x.shape[0] != c.numel():
        raise CoefficientError(f"{c.numel()} per-example coefficients for a batch of {x.shape[0]} rows; "
                               "give one value per row, or one value for all")

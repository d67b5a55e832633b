"""Adapter kinds with a signed coefficient, in one registry.

Each kind = a class deriving from ``Adapter`` (config lives in ``AdapterConfig``) with an
``attach`` and an ``apply(c)`` context manager. Its parameters are named with the kind's
prefix (``lora_``, ``additive_``) so trainable-parameter selection and the base checksum work
by name. ``KINDS`` drives the generic tests.
"""

from __future__ import annotations

from .additive import AdditiveAdapter
from .base import Adapter, attached_adapter
from .lora import LoraAdapter

KINDS: dict[str, type[Adapter]] = {
    "additive": AdditiveAdapter,
    "lora": LoraAdapter,
}

_PREFIXES = tuple(p for k in KINDS.values() for p in k.param_prefixes)


def is_adapter_name(name: str) -> bool:
    return any(part.startswith(_PREFIXES) for part in name.split("."))


def attach(model, cfg, directions=None):
    """Attach an adapter of kind ``cfg.kind``; returns (model to call, adapter)."""
    try:
        cls = KINDS[cfg.kind]
    except KeyError:
        raise ValueError(f"unknown adapter kind {cfg.kind!r}; valid kinds: {sorted(KINDS)}") from None
    return cls.attach(model, cfg, directions)


__all__ = ["Adapter", "AdditiveAdapter", "LoraAdapter", "KINDS", "attach", "attached_adapter",
           "is_adapter_name"]

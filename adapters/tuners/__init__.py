"""Adapter kinds with a signed coefficient, in one registry.

Each kind = a class deriving from ``Adapter`` (its options: ``AdapterConfig.<kind>``, of the class's
``options`` dataclass) with
``attach``, an ``apply(c)`` context manager and ``merge_into``. Its parameters are named with
the kind's prefix (``lora_``, ``boft_`` ...) so trainable-parameter selection and the base
checksum work by name. ``KINDS`` drives the generic tests.

| kind     | acts on                   | coefficient                  | -c vs +c        | per-example c |
|----------|---------------------------|------------------------------|-----------------|---------------|
| additive | residual / module outputs | h + c·w                      | exact inverse   | yes           |
| lora     | Linear (peft)             | W + c·s·BA                   | exact inverse   | yes           |
| boft     | Linear input (peft)       | Cayley Q -> cQ, s -> s^c     | exact inverse   | no            |
| oft      | Linear input (peft)       | Cayley Q -> cQ               | exact inverse   | no            |
| road     | Linear output (peft)      | θ -> cθ, α -> α^c            | exact (road_1)  | no            |
| ether    | Linear input or output    | H = I + c(P_v - P_u)         | first order     | yes           |
"""

from __future__ import annotations

from ..config import AdapterConfig
from .additive import AdditiveAdapter
from .base import Adapter, attached_adapter
from .ether import EtherAdapter
from .lora import LoraAdapter
from .orthogonal import BoftAdapter, OftAdapter
from .road import RoadAdapter

KINDS: dict[str, type[Adapter]] = {
    "additive": AdditiveAdapter,
    "lora": LoraAdapter,
    "boft": BoftAdapter,
    "oft": OftAdapter,
    "road": RoadAdapter,
    "ether": EtherAdapter,
}

_PREFIXES = tuple(p for k in KINDS.values() for p in k.param_prefixes)


def is_adapter_name(name: str) -> bool:
    return any(part.startswith(_PREFIXES) for part in name.split("."))


def attach(model, adapter_cfg: AdapterConfig, directions=None):
    """Attach an adapter of kind ``adapter_cfg.kind``; returns (model to call, adapter).

    On a bitsandbytes base, peft's RoAd layers get their output dtype fixed."""
    from .. import hidden

    try:
        cls = KINDS[adapter_cfg.kind]
    except KeyError:
        raise ValueError(f"unknown adapter kind {adapter_cfg.kind!r}; valid kinds: {sorted(KINDS)}") from None
    model, adapter = cls.attach(model, adapter_cfg, directions)
    if getattr(hidden.base_model_of(model), "is_quantized", False) and adapter_cfg.kind == "road":
        for layer in adapter.tuner_layers().values():
            layer.register_forward_hook(_output_in_input_dtype)
    return model, adapter


def _output_in_input_dtype(_layer, args, out):
    """peft 0.21.2 RoAd bnb layers cast ``x`` instead of the result back after the float32
    rotation (``x = x.to(expected_dtype)`` in ``road/bnb.py``), so a bf16 model got a float32
    output and the (bf16) output head failed; a bitsandbytes layer returns its input's dtype."""
    x = args[0]
    return out.to(x.dtype) if out.dtype != x.dtype else None


__all__ = ["Adapter", "AdditiveAdapter", "BoftAdapter", "EtherAdapter", "LoraAdapter", "OftAdapter",
           "RoadAdapter", "KINDS", "attach", "attached_adapter", "is_adapter_name"]

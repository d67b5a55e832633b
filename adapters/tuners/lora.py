"""peft LoRA with a signed coefficient: ``W + c * s * B A`` (``s`` = peft's ``scaling``).

Exact mirror (the update is linear in ``c``). ``c`` multiplies peft's float ``scaling`` for
the duration of the context, which peft reads at every forward (and in ``merge``), so a
1-d ``c`` gives one coefficient per batch row; ``c == 0`` takes peft's disabled-adapter
path, bitwise the base model. Exported for serving as a plain peft folder, where the
coefficient is peft's own scale (``peft.helpers.rescale_adapter_scale(model, c)``).
"""

from __future__ import annotations

import contextlib

import torch

from ..config import AdapterConfig, LoraOptions
from .peft_base import ADAPTER_NAME, PeftAdapter


class LoraAdapter(PeftAdapter):
    kind = "lora"
    param_prefixes = ("lora_",)
    options = LoraOptions
    quantizable = True
    exact_inverse = True
    per_example = True
    layer_class_path = ("peft.tuners.lora", "LoraLayer")

    @classmethod
    def peft_config(cls, adapter_cfg: AdapterConfig, targets):
        from peft import LoraConfig

        options = adapter_cfg.lora
        return LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                          target_modules=targets, init_lora_weights=True, bias="none")

    def lora_layers(self):
        return list(self.tuner_layers().values())

    @contextlib.contextmanager
    def at(self, layer, c):
        if torch.is_tensor(c) and c.dim() == 1:  # per-example coefficient, (B,) -> (B, 1, 1)
            c = c.view(-1, 1, 1)
        saved = dict(layer.scaling)
        try:
            layer.scaling[ADAPTER_NAME] = layer.scaling[ADAPTER_NAME] * c
            yield
        finally:
            layer.scaling.clear()
            layer.scaling.update(saved)

    @contextlib.contextmanager
    def coefficient(self, c):  # scaling is read at every forward: set it once for the block
        with contextlib.ExitStack() as stack:
            for layer in self.lora_layers():
                stack.enter_context(self.at(layer, c))
            yield

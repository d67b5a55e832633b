"""peft LoRA with a signed coefficient: ``W + c * s * B A`` (``s`` = peft's ``scaling``).

Exact mirror (the update is linear in ``c``). ``c`` multiplies peft's float ``scaling`` for
the duration of the context, which peft reads at every forward; ``c == 0`` takes peft's
``disable_adapter()`` path, bitwise the base model.
"""

from __future__ import annotations

import contextlib

import torch

from .. import hidden
from .base import Adapter

ADAPTER_NAME = "default"


class LoraAdapter(Adapter):
    kind = "lora"
    param_prefixes = ("lora_",)

    @classmethod
    def attach(cls, model, cfg, directions=None):
        from peft import LoraConfig, get_peft_model

        targets = hidden.resolve(model, cfg.layers, cfg.depth)
        for t in targets:
            if not isinstance(hidden.get_module(model, t), torch.nn.Linear):
                raise ValueError(f"LoRA needs Linear modules; {t!r} is a "
                                 f"{type(hidden.get_module(model, t)).__name__}. Use patterns such as "
                                 "model.layers.{N}.self_attn.o_proj or model.layers.{N}.mlp.down_proj")
        pcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=targets, init_lora_weights=True, bias="none")
        peft_model = get_peft_model(model, pcfg, adapter_name=ADAPTER_NAME)
        for n, p in peft_model.named_parameters():
            p.requires_grad_("lora_" in n)
        adapter = cls(peft_model, cfg)
        adapter.targets = targets
        adapter.bind(peft_model)
        return peft_model, adapter

    def lora_layers(self):
        from peft.tuners.lora import LoraLayer

        return [m for m in self.model.modules() if isinstance(m, LoraLayer)]

    def trainable_parameters(self):
        return [p for n, p in self.model.named_parameters() if "lora_" in n]

    def state_tensors(self):
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model, adapter_name=ADAPTER_NAME)

    def load_state_tensors(self, tensors):
        from peft import set_peft_model_state_dict

        self._check_keys(tensors)
        result = set_peft_model_state_dict(self.model, tensors, adapter_name=ADAPTER_NAME)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"LoRA adapter file holds keys this model lacks: {unexpected[:5]}")

    @contextlib.contextmanager
    def apply(self, c):
        if torch.is_tensor(c) and c.dim() == 1:  # per-example coefficient, (B,) -> (B, 1, 1)
            c = c.view(-1, 1, 1)
        layers = self.lora_layers()
        saved = [dict(m.scaling) for m in layers]
        try:
            for m in layers:
                m.scaling[ADAPTER_NAME] = m.scaling[ADAPTER_NAME] * c
            yield
        finally:
            for m, s in zip(layers, saved):
                m.scaling.clear()
                m.scaling.update(s)

    @contextlib.contextmanager
    def off(self):
        with self.model.disable_adapter():
            yield

"""peft BOFT and OFT with a signed coefficient on the Cayley generator: ``Q -> c·Q``.

Both rotate the input side of a frozen Linear with a block-diagonal orthogonal matrix
``R = (I - Q)(I + Q)^-1`` (exact Cayley transform, Q skew-symmetric and linear in the stored
parameter). With ``Q -> c·Q``: ``R(0) = I`` and ``R(-c) = R(c)^-1 = R(c)^T``, an exact inverse.
BOFT also scales each output row by ``s``; it becomes ``s ** c`` (exact inverse too).

* OFT is built with ``use_cayley_neumann=False``: peft's default truncated Neumann series is
  not orthogonal and approximates the transposed rotation (docs/peft.md).
* BOFT is built with ``boft_n_butterfly_factor=1`` (one block-diagonal factor): a product of
  several butterfly factors is only a first-order mirror, and its shape depends on whether
  peft's CUDA extension compiled, so an adapter would not load on another machine.
"""

from __future__ import annotations

import torch

from ..config import AdapterConfig, BoftOptions, OftOptions
from .peft_base import ADAPTER_NAME, SwapAdapter, positive_power, scaled


def _skip_boft_cuda_build() -> None:
    """Without CUDA, peft retries (and fails) a JIT build of its BOFT CUDA extension once per
    adapted layer, with two warnings each; record the failure once instead."""
    import peft.tuners.boft.layer as boft_layer

    if not torch.cuda.is_available() and boft_layer._FBD_CUDA is None:
        boft_layer._FBD_CUDA = False


class _BlockRotation(SwapAdapter):
    """Shared by BOFT and OFT: blocks of ``adapter.<kind>.block_size`` must tile each input."""

    @classmethod
    def check_target(cls, name, module, adapter_cfg: AdapterConfig):
        super().check_target(name, module, adapter_cfg)
        block = getattr(adapter_cfg, cls.kind).block_size
        if module.in_features % block:
            raise ValueError(f"adapter.{cls.kind}.block_size {block} does not divide the input size "
                             f"{module.in_features} of {name!r} ({cls.kind} rotates blocks of the input); "
                             f"choose a divisor of {module.in_features}")


class BoftAdapter(_BlockRotation):
    kind = "boft"
    param_prefixes = ("boft_",)
    exact_inverse = True
    options = BoftOptions
    layer_class_path = ("peft.tuners.boft.layer", "BOFTLayer")

    @classmethod
    def peft_config(cls, adapter_cfg: AdapterConfig, targets):
        from peft import BOFTConfig

        _skip_boft_cuda_build()
        return BOFTConfig(boft_block_size=adapter_cfg.boft.block_size, boft_block_num=0, boft_n_butterfly_factor=1,
                          boft_dropout=adapter_cfg.boft.dropout, target_modules=targets, init_weights=True, bias="none")

    def swaps(self, layer):
        return [(layer.boft_R, ADAPTER_NAME, scaled),
                (layer.boft_s, ADAPTER_NAME, positive_power)]


class OftAdapter(_BlockRotation):
    kind = "oft"
    param_prefixes = ("oft_",)
    quantizable = True
    exact_inverse = True
    options = OftOptions
    layer_class_path = ("peft.tuners.oft.layer", "OFTLayer")

    @classmethod
    def peft_config(cls, adapter_cfg: AdapterConfig, targets):
        from peft import OFTConfig

        return OFTConfig(r=0, oft_block_size=adapter_cfg.oft.block_size, use_cayley_neumann=False, coft=False,
                         block_share=False, target_modules=targets, init_weights=True, bias="none")

    def swaps(self, layer):
        return [(layer.oft_R[ADAPTER_NAME], "weight", scaled)]

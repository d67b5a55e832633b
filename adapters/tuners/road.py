"""peft RoAd with a signed coefficient: ``θ -> c·θ``, ``α -> α ** c``.

RoAd rotates and scales pairs of output features (element i with i + g/2 in each group of
``group_size``): ``y -> α·Rot(θ) y``. At coefficient c this is ``α^c·Rot(cθ)``: the base at
c = 0 and, for ``road_1`` (one θ, α per pair), an exact inverse at -c. ``road_2`` / ``road_4``
give each 2×2 block two angles and scales, so there -c is only a first-order mirror.
RoAd acts on the output side, so it also rotates the Linear's bias.
"""

from __future__ import annotations

from ..config import AdapterConfig, RoadOptions
from .peft_base import ADAPTER_NAME, SwapAdapter, positive_power, scaled


class RoadAdapter(SwapAdapter):
    kind = "road"
    param_prefixes = ("road_",)
    quantizable = True
    exact_inverse = True
    options = RoadOptions
    layer_class_path = ("peft.tuners.road.layer", "RoadLayer")

    @classmethod
    def check_target(cls, name, module, adapter_cfg: AdapterConfig):
        super().check_target(name, module, adapter_cfg)
        if module.out_features % adapter_cfg.road.group_size:
            raise ValueError(f"adapter.road.group_size {adapter_cfg.road.group_size} does not divide the output size "
                             f"{module.out_features} of {name!r} (RoAd pairs output features within "
                             f"groups); choose an even divisor of {module.out_features}")

    @classmethod
    def peft_config(cls, adapter_cfg: AdapterConfig, targets):
        from peft import RoadConfig

        options = adapter_cfg.road
        return RoadConfig(variant=options.variant, group_size=options.group_size, target_modules=targets,
                          init_weights=True)

    def swaps(self, layer):
        return [(layer.road_theta, ADAPTER_NAME, scaled),
                (layer.road_alpha, ADAPTER_NAME, positive_power)]

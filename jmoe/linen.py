"""A Flax Linen adapter around the functional MoE core.

    layer = jmoe.linen.MoE(cfg)
    variables = layer.init(key, x_BTD)
    y_BTD, aux = layer.apply(variables, x_BTD)

Parameters live in the `params` collection under the same names as
`jmoe.init_params`; the aux-loss-free bias lives in the `router_bias`
collection (update it with `jmoe.routing.update_bias`, outside the optimizer).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax

from jmoe.config import MoEConfig
from jmoe.moe import init_bias, init_params, moe_apply, selection_bias
from jmoe.placement import PlacementArrays


class MoE(nn.Module):
    cfg: MoEConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, rng: Optional[jax.Array] = None,
                 placement: Optional[PlacementArrays] = None):
        # One key makes the whole parameter tree so Linen, NNX and plain JAX
        # initialise identically from the same seed.
        params = self.param("moe", lambda key: init_params(key, self.cfg))
        bias = self.variable("router_bias", "bias", lambda: init_bias(self.cfg))
        return moe_apply(params, x, self.cfg, bias=selection_bias(self.cfg, bias.value),
                         train=train, rng=rng, placement=placement)

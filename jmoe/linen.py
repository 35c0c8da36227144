"""A Flax Linen adapter around the functional MoE core.

    layer = jmoe.linen.MoE(cfg)
    variables = layer.init(key, x_BTD)
    y_BTD, aux = layer.apply(variables, x_BTD)

Every weight is its own `self.param(name, init, shape, dtype)`, under the
same names as `jmoe.init_params` (`params/router/w_DE`,
`params/experts/w_up_EDF`, ...), so `variables["params"]` is exactly the tree
`jmoe.moe_apply` takes. Each carries logical axis names
(`jmoe.logical.LOGICAL_AXES`) through `nn.with_logical_partitioning`, so
`nn.get_partition_spec` and `nn.logical_to_mesh_sharding(specs, mesh,
jmoe.logical.axis_rules(mesh))` place the experts over the `expert` axis.

Only `router='sigmoid_topk'` has a `router_bias` collection (`router/bias`,
the aux-loss-free selection bias; the NNX module's `RouterBias`, the same
name under `nnx.bridge`). Update it with `jmoe.routing.update_bias`, outside
the optimizer.

Randomness follows Linen: router jitter (`MoEConfig.jitter_eps`) runs when
the layer is not deterministic and draws from the `dropout` RNG stream
(`apply(..., rngs={"dropout": key})`); `train=`/`rng=` still work as before.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmoe.config import MoEConfig
from jmoe.logical import LOGICAL_AXES
from jmoe.moe import BIAS_COLLECTION, init_params, moe_apply
from jmoe.placement import PlacementArrays


@functools.lru_cache(maxsize=64)
def weight_shapes(cfg: MoEConfig) -> dict:
    """{group: {name: shape}} of `jmoe.init_params(key, cfg)`, read from it (no
    second copy of the layout to keep in step)."""
    tree = jax.eval_shape(lambda: init_params(jax.random.key(0), cfg))
    return {g: {k: tuple(v.shape) for k, v in leaves.items()} for g, leaves in tree.items()}


def _init(key: jax.Array, shape: tuple, dtype=jnp.float32) -> jax.Array:
    """`jmoe.init_params`'s scheme for one weight: truncated normal in
    [-2, 2] over sqrt(fan_in), fan_in the contracted (second-last) dim."""
    return jax.nn.initializers.truncated_normal(stddev=shape[-2] ** -0.5)(key, shape, dtype)


class _Weights(nn.Module):
    """One group of the layer's weights (`router`, `experts`, `shared`)."""

    shapes: tuple  # ((name, shape), ...)
    param_dtype: str
    bias_experts: int = 0  # > 0: also the router's selection bias (sigmoid_topk)

    @nn.compact
    def __call__(self):
        # Positional (name, init, shape, dtype), as Flax's own layers call it,
        # so a process-wide wrapper of nn.Module.param (gemma's dtype policy
        # requires `shape`) sees an ordinary parameter.
        w = {name: self.param(name, nn.with_logical_partitioning(_init, LOGICAL_AXES[name]),
                              shape, jnp.dtype(self.param_dtype))
             for name, shape in self.shapes}
        bias = None
        if self.bias_experts:
            bias = self.variable(BIAS_COLLECTION, "bias",
                                 lambda: jnp.zeros((self.bias_experts,), jnp.float32)).value
        return w, bias


class MoE(nn.Module):
    """The MoE layer as a Linen module: `x[..., D] -> (y[..., D], MoEAux)`.

    Attributes:
      cfg: the layer's `MoEConfig` (dtypes may be `jnp` types).
      deterministic: no router jitter when True; may be given per call
        instead (the call's value wins), as for `nn.Dropout`. Left None in
        both, the layer does not jitter.
      return_aux: False returns `y` alone (an MLP's signature) and sows the
        `MoEAux` into `intermediates` as `aux`; collect it with
        `apply(..., mutable=["intermediates"])` and `jmoe.aux_loss`.
      mesh: None runs expert-parallel over the ambient mesh (`jax.set_mesh`)
        when it has `expert`/`data` axes; False always runs the local path;
        a `Mesh` runs over that mesh.
      rng_collection: the RNG stream jitter draws from.
    """

    cfg: MoEConfig
    deterministic: Optional[bool] = None
    return_aux: bool = True
    mesh: Any = None
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: Optional[bool] = None,
                 train: Optional[bool] = None, rng: Optional[jax.Array] = None,
                 placement: Optional[PlacementArrays] = None):
        """`train` (explicit) wins over `deterministic`; `rng` over the stream."""
        cfg = self.cfg
        shapes = weight_shapes(cfg)
        sigmoid = cfg.router == "sigmoid_topk"
        params, bias = {}, None
        for group, leaves in shapes.items():
            w, b = _Weights(tuple(leaves.items()), cfg.param_dtype,
                            bias_experts=cfg.num_experts if sigmoid and group == "router" else 0,
                            name=group)()
            params[group] = w
            bias = b if b is not None else bias
        if train is None:
            det = deterministic if deterministic is not None else self.deterministic
            train = det is False
        if train and cfg.jitter_eps > 0 and rng is None:
            if not self.has_rng(self.rng_collection):
                raise ValueError(
                    f"MoEConfig.jitter_eps > 0 and the layer is training, but no "
                    f"'{self.rng_collection}' RNG was given: apply(..., rngs="
                    f"{{'{self.rng_collection}': key}}), or pass deterministic=True.")
            rng = self.make_rng(self.rng_collection)
        y, aux = moe_apply(params, x, cfg, bias=bias, train=train, rng=rng, mesh=self.mesh,
                           placement=placement)
        if self.return_aux:
            return y, aux
        self.sow("intermediates", "aux", aux)
        return y

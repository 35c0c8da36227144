"""The MoE layers' auxiliary losses, collected from a model's state.

    y = model.apply(variables, x, mutable=["intermediates"])     # Linen
    loss_aux, per_layer = jmoe.aux_loss(y[1]["intermediates"],
                                        {"load_balance_loss": 1e-2, "z_loss": 1e-3})

    y, sown = nnx.capture(model, nnx.Intermediate)(x)            # NNX
    loss_aux, per_layer = jmoe.aux_loss(sown, {"load_balance_loss": 1e-2})
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jmoe.stats import MoEAux

# The per-layer scalars a weight may name (expert_load / expert_prob are [E]).
SCALAR_FIELDS = ("load_balance_loss", "z_loss", "dropped_fraction", "router_entropy")


def aux_loss(tree: Any, weights: Mapping[str, float]) -> tuple[jax.Array, dict]:
    """Weighted auxiliary loss of every `MoEAux` found in `tree`.

    Args:
      tree: any pytree holding `MoEAux` values: a Linen `intermediates`
        collection, an `nnx.State` of `nnx.Intermediate`s, or the `MoEAux`
        returned by a layer (a stacked one, e.g. the GPT's, counts its leading
        axis as layers). A layer called twice contributes twice.
      weights: {field: weight} over `SCALAR_FIELDS`, e.g.
        `{"load_balance_loss": 1e-2, "z_loss": 1e-3}`.

    Returns:
      `(loss, per_layer)`: loss = sum over fields of weight * (mean of the
      field over layers) -- the mean, as jmoe's trainer does, so a weight
      means the same there and here; per_layer = {path: MoEAux}, the path of
      each found value in `tree` ("blocks/0/mlp/aux/0").
    """
    for name in weights:
        if name not in SCALAR_FIELDS:
            raise ValueError(f"aux_loss weights[{name!r}] is not a loss of MoEAux: use "
                             f"keys from {SCALAR_FIELDS}.")
    found = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, MoEAux))[0]
    per_layer = {_path(p): a for p, a in found if isinstance(a, MoEAux)}
    if not per_layer:
        raise ValueError("aux_loss found no MoEAux in the tree: build the layers with "
                         "return_aux=False and collect intermediates (Linen: apply(..., "
                         "mutable=['intermediates']); NNX: nnx.capture(model, nnx.Intermediate)).")
    total = jnp.zeros((), jnp.float32)
    for name, w in weights.items():
        values = jnp.concatenate([jnp.ravel(getattr(a, name)).astype(jnp.float32)
                                  for a in per_layer.values()])
        total = total + w * jnp.mean(values)
    return total, per_layer


def _path(path) -> str:
    """'blocks/0/mlp/aux/0' from a key path (dict keys, attributes, indices)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
            continue  # an nnx.Variable's payload, not a level of the model
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


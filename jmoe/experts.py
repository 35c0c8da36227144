"""Expert MLPs on stacked weights (pure functions).

Weights: `w_gate_EDF` (gated activations: SwiGLU, GeGLU), `w_up_EDF`, `w_down_EFD`. Two layouts of
the token rows:

* grouped `[R, D]` rows sorted by expert with `group_sizes_E` (dropless):
  every matmul goes through the one seam `jmoe.kernels.gmm`;
* dense `[E, C, D]` capacity buffers: batched einsums.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from jmoe import kernels
from jmoe.config import ACTIVATIONS, GATED_ACTIVATIONS


def activation_fn(name: str, gate: jax.Array, up: jax.Array | None) -> jax.Array:
    """The hidden layer from the gate (or only) projection and, gated, the up one."""
    if name == "swiglu":
        return jax.nn.silu(gate) * up
    if name == "geglu":
        # tanh-approximate GELU, as Gemma's FeedForward (`nn.gelu` default)
        return jax.nn.gelu(gate, approximate=True) * up
    if name == "gelu":
        return jax.nn.gelu(gate)
    raise ValueError(f"activation={name!r} is unknown; use one of {ACTIVATIONS}.")


def grouped_mlp(x_RD: jax.Array, w: Mapping[str, jax.Array], group_sizes_E: jax.Array,
                activation: str, backend: str = "auto") -> jax.Array:
    """[R, D] rows grouped by expert -> [R, D]; rows past sum(group_sizes) give 0."""
    mm = lambda lhs, rhs: kernels.gmm(lhs, rhs, group_sizes_E, backend=backend)
    if activation in GATED_ACTIVATIONS:
        h_RF = activation_fn(activation, mm(x_RD, w["w_gate_EDF"]), mm(x_RD, w["w_up_EDF"]))
    else:
        h_RF = activation_fn(activation, mm(x_RD, w["w_up_EDF"]), None)
    return mm(h_RF, w["w_down_EFD"])


def batched_hidden(x_ECD: jax.Array, w: Mapping[str, jax.Array], activation: str) -> jax.Array:
    """[E, C, D] -> [E, C, F]: the activated hidden layer of each expert."""
    mm = lambda lhs, rhs: jnp.einsum("ecd,edf->ecf", lhs, rhs.astype(lhs.dtype))
    if activation in GATED_ACTIVATIONS:
        return activation_fn(activation, mm(x_ECD, w["w_gate_EDF"]), mm(x_ECD, w["w_up_EDF"]))
    return activation_fn(activation, mm(x_ECD, w["w_up_EDF"]), None)


def batched_mlp(x_ECD: jax.Array, w: Mapping[str, jax.Array], activation: str) -> jax.Array:
    """[E, C, D] capacity buffers -> [E, C, D]: expert e on its own C rows."""
    h_ECF = batched_hidden(x_ECD, w, activation)
    return jnp.einsum("ecf,efd->ecd", h_ECF, w["w_down_EFD"].astype(h_ECF.dtype))


def dense_mlp(x_TD: jax.Array, w: Mapping[str, jax.Array], activation: str,
              dot: Callable[[jax.Array, jax.Array], jax.Array] = jnp.dot) -> jax.Array:
    """One ordinary MLP (the shared experts): weights `w_gate_DF`, `w_up_DF`, `w_down_FD`.

    x_TD may carry more leading dimensions ([B, T, D]); `dot` is `jnp.dot` or
    a drop-in for it (the GPT's FSDP ring, `jmoe.sharding.fsdp.ring_dot`).
    """
    mm = lambda lhs, rhs: dot(lhs, rhs.astype(lhs.dtype))
    if activation in GATED_ACTIVATIONS:
        h_TF = activation_fn(activation, mm(x_TD, w["w_gate_DF"]), mm(x_TD, w["w_up_DF"]))
    else:
        h_TF = activation_fn(activation, mm(x_TD, w["w_up_DF"]), None)
    return mm(h_TF, w["w_down_FD"])

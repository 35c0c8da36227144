"""Expert MLPs on stacked weights (pure functions).

Weights: `w_gate_EDF` (gated activations: SwiGLU, GeGLU), `w_up_EDF`, `w_down_EFD`, and with
`MoEConfig.expert_bias` the biases `b_gate_EF`, `b_up_EF`, `b_down_ED`. Two layouts of
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


def activation_fn(name: str, gate: jax.Array, up: jax.Array | None, alpha: float = 1.702,
                  limit: float = 7.0) -> jax.Array:
    """The hidden layer from the gate (or only) projection and, gated, the up one.
    `alpha`, `limit`: the `swiglu_clamped` activation's (MoEConfig.swiglu_*)."""
    if name == "swiglu":
        return jax.nn.silu(gate) * up
    if name == "swiglu_clamped":
        # GPT-OSS: the gate is clamped from above only, the up projection both ways.
        g = jnp.minimum(gate, limit)
        return (jnp.clip(up, -limit, limit) + 1) * g * jax.nn.sigmoid(alpha * g)
    if name == "geglu":
        # tanh-approximate GELU, as Gemma's FeedForward (`nn.gelu` default)
        return jax.nn.gelu(gate, approximate=True) * up
    if name == "gelu":
        return jax.nn.gelu(gate)
    raise ValueError(f"activation={name!r} is unknown; use one of {ACTIVATIONS}.")


def grouped_mlp(x_RD: jax.Array, w: Mapping[str, jax.Array], group_sizes_E: jax.Array,
                activation: str, backend: str = "auto", alpha: float = 1.702,
                limit: float = 7.0, tiling: str = "auto") -> jax.Array:
    """[R, D] rows grouped by expert -> [R, D]; rows past sum(group_sizes) give 0.
    `tiling`: the grouped matmul's shipped tiling class (`kernels.gmm`)."""
    mm = lambda lhs, rhs: kernels.gmm(lhs, rhs, group_sizes_E, backend=backend, tiling=tiling)
    if "b_up_EF" not in w:
        bias = lambda y, name: y
    else:
        # Each row's expert from the group sizes; rows past the groups stay 0.
        r = x_RD.shape[0]
        ends_E = jnp.cumsum(group_sizes_E)
        expert_R = jnp.searchsorted(ends_E, jnp.arange(r), side="right")
        expert_R = jnp.minimum(expert_R, group_sizes_E.shape[0] - 1)
        live_R1 = (jnp.arange(r) < ends_E[-1])[:, None]
        bias = lambda y, name: jnp.where(live_R1, y + w[name][expert_R].astype(y.dtype), 0)
    if activation in GATED_ACTIVATIONS:
        h_RF = activation_fn(activation, bias(mm(x_RD, w["w_gate_EDF"]), "b_gate_EF"),
                             bias(mm(x_RD, w["w_up_EDF"]), "b_up_EF"), alpha, limit)
    else:
        h_RF = activation_fn(activation, mm(x_RD, w["w_up_EDF"]), None)
    return bias(mm(h_RF, w["w_down_EFD"]), "b_down_ED")


def _bias_E1X(w: Mapping[str, jax.Array], name: str, y):
    """Expert bias `name` broadcast over the capacity rows ([E, 1, X]), or 0."""
    return w[name][:, None, :].astype(y.dtype) if name in w else 0


def batched_hidden(x_ECD: jax.Array, w: Mapping[str, jax.Array], activation: str,
                   alpha: float = 1.702, limit: float = 7.0) -> jax.Array:
    """[E, C, D] -> [E, C, F]: the activated hidden layer of each expert."""
    def mm(lhs, name):
        y = jnp.einsum("ecd,edf->ecf", lhs, w[name].astype(lhs.dtype))
        return y + _bias_E1X(w, name.replace("w_", "b_").replace("_EDF", "_EF"), y)
    if activation in GATED_ACTIVATIONS:
        return activation_fn(activation, mm(x_ECD, "w_gate_EDF"), mm(x_ECD, "w_up_EDF"),
                             alpha, limit)
    return activation_fn(activation, mm(x_ECD, "w_up_EDF"), None)


def batched_mlp(x_ECD: jax.Array, w: Mapping[str, jax.Array], activation: str,
                alpha: float = 1.702, limit: float = 7.0) -> jax.Array:
    """[E, C, D] capacity buffers -> [E, C, D]: expert e on its own C rows."""
    h_ECF = batched_hidden(x_ECD, w, activation, alpha, limit)
    y_ECD = jnp.einsum("ecf,efd->ecd", h_ECF, w["w_down_EFD"].astype(h_ECF.dtype))
    return y_ECD + _bias_E1X(w, "b_down_ED", y_ECD)


def dense_mlp(x_TD: jax.Array, w: Mapping[str, jax.Array], activation: str,
              dot: Callable[[jax.Array, jax.Array], jax.Array] = jnp.dot,
              alpha: float = 1.702, limit: float = 7.0) -> jax.Array:
    """One ordinary MLP (the shared experts): weights `w_gate_DF`, `w_up_DF`, `w_down_FD`.

    x_TD may carry more leading dimensions ([B, T, D]); `dot` is `jnp.dot` or
    a drop-in for it (the GPT's FSDP ring, `jmoe.sharding.fsdp.ring_dot`).
    """
    mm = lambda lhs, rhs: dot(lhs, rhs.astype(lhs.dtype))
    if activation in GATED_ACTIVATIONS:
        h_TF = activation_fn(activation, mm(x_TD, w["w_gate_DF"]), mm(x_TD, w["w_up_DF"]),
                             alpha, limit)
    else:
        h_TF = activation_fn(activation, mm(x_TD, w["w_up_DF"]), None)
    return mm(h_TF, w["w_down_FD"])

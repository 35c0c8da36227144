"""jmoe: Mixture-of-Experts layers, kernels and a trainer for JAX.

Dimension alphabet used in names, einsum strings and partition specs:

  B batch            T sequence (or flat tokens)   D model width
  F expert hidden    H attention heads             E experts
  K top-k            C capacity per expert         G groups (grouped matmul)
  M rows of a grouped matmul                       V vocabulary
  R rows of an expert buffer (E*C for capacity, padded T*K for dropless)
  A token-expert assignments (T*K)

A tensor carries its shape in its name: `x_BTD`, `w_EDF`, `logits_TE`.
"""

from jmoe.config import MoEConfig
from jmoe.moe import MoE, MoEAux, RouterBias, init_bias, init_params, moe_apply
from jmoe import dispatch, experts, kernels, linen, routing, sharding

__all__ = ["MoEConfig", "MoE", "MoEAux", "RouterBias", "init_params", "init_bias",
           "moe_apply", "routing", "dispatch", "experts", "kernels", "linen", "sharding"]
__version__ = "0.1.0"

"""jmoe: Mixture-of-Experts layers, kernels and a trainer for JAX.

Dimension alphabet: one meaning per letter, in names, einsum strings and
partition specs (a tensor carries its shape in its name: `x_BTD`, `w_EDF`).

  B batch                          T sequence (or flat tokens)
  D model width                    F hidden width (expert or dense MLP)
  H query heads                    J key/value heads (grouped-query attention)
  Q size of one attention head     V vocabulary
  E experts                        K top-k: experts chosen per token
  C capacity: slots per expert     X experts in one routing group (n_group)
  A token-expert assignments (T*K) R rows of an expert buffer (E*C, or A padded)
  G groups of a grouped matmul     M rows of a grouped matmul
  I contraction (inner) width of a grouped matmul
  N output columns of a grouped matmul
  P peer devices on the `expert` mesh axis
  S physical expert slots of one device (a placement; experts plus replicas)
  Y replicas of one expert          Z rows of one peer's buffer in a padded exchange
  L layers                         W logged steps (metrics over time)
  U micro-batches of one optimizer step (gradient accumulation)
  1 after T: the T+1 tokens of a training row (inputs and next-token targets)
"""

from jmoe.config import Execution, MoEConfig
from jmoe.moe import MoE, MoEAux, RouterBias, init_bias, init_params, moe_apply
from jmoe import dispatch, experts, kernels, linen, logical, routing, sharding, stats
from jmoe.logical import axis_rules
from jmoe.losses import aux_loss
# `jmoe.moefy` is the function (the module's other names are re-exported here).
from jmoe.moefy import moefy, upcycle_params, upcycled_params

__all__ = ["MoEConfig", "Execution", "MoE", "MoEAux", "RouterBias", "init_params", "init_bias",
           "moe_apply", "routing", "dispatch", "experts", "kernels", "linen", "sharding", "stats",
           "logical", "axis_rules", "aux_loss", "moefy", "upcycle_params", "upcycled_params"]
__version__ = "0.1.0"

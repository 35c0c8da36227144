"""The planner: an analytic time and memory model of a GPT-MoE training step,
and the search that picks an execution plan (`python -m jmoe.plan`).

Per layer and per device, every region of the forward and backward pass is
priced with a roofline on a hardware profile:

  matmuls    max(FLOPs / (peak x efficiency), bytes / memory bandwidth)
  memory ops bytes moved / (memory bandwidth x efficiency)   (norms, gathers)
  all-to-all fixed cost + per-peer cost + bytes / link bandwidth, on the
             slower of the intra-node and inter-node links (flat), or both
             levels one after the other (two-level, Tutel's 2DH)

One job per module; each imports only modules listed before it:

  calibrate   micro-benchmarks of this machine for the `cpu-local` profile
  hardware    datasheet profiles, and `cpu-local` from `calibrate`'s numbers
  primitives  roofline, all-to-all, ring collectives, the overlap pipeline
  load        expert load distributions and the drops they cause
  layer_cost  attention, dense FFN and MoE layers, region by region
  step_cost   a whole training step: layers, gradient sync, optimizer, memory
  search      candidate settings, costed, filtered and ranked
  cli         `python -m jmoe.plan`

The planner reads configs (`jmoe.config`, `jmoe.model_config`) and never
builds the model. What it leaves out is listed in `ASSUMPTIONS`. Shapes
follow `jmoe/__init__.py`; all times are seconds, sizes bytes.
"""

ASSUMPTIONS = (
    "Times are per device; devices run in lockstep, so a step lasts as long as its "
    "slowest device (the most loaded one under imbalance).",
    "Matmuls, attention and grouped matmuls reach a fixed share of the datasheet "
    "peak (profile fields mm_eff, attn_eff, gmm_eff; assumed on GPUs, measured on "
    "cpu-local); backward = 2x forward FLOPs; remat='full' recomputes the forward "
    "(all-to-alls included), remat='dots' recomputes everything but plain matmuls.",
    "The expert axis is the fastest-varying mesh axis, so an expert-parallel group "
    "of <= devices_per_node devices stays inside one node.",
    "An all-to-all costs a fixed time, a per-peer time and bytes / bandwidth on "
    "each link; a flat one drives NVLink and InfiniBand at once (the slower "
    "decides), a two-level one runs the intra-node step, two local copies and "
    "the inter-node step in sequence (same inter-node bytes, fewer, larger "
    "messages).",
    "Overlap: only the MoE exchange is pipelined (chunk i+1's all-to-all with "
    "chunk i's experts), and only where collectives are asynchronous (GPU). "
    "Gradient all-reduces overlap the backward pass of the last micro-batch.",
    "The dropless path uses lax.ragged_all_to_all (actual rows) or the padded dense "
    "emulation (ep slots of the chosen bucket) as Execution.ragged decides for the "
    "backend, exactly as the runtime does (native on GPU without a hierarchy, dense on "
    "CPU or with a2a_hierarchy > 1); the exchange runs in the smallest ep_buckets slot "
    "that holds the busiest (source, destination) pair, else in the fallback receive "
    "buffer of ep_recv_factor x (or ep x) the local assignments; the cost is the "
    "expectation over that choice, with binomial pair counts (normal approximation).",
    "Capacity drops are estimated per shard and expert with a normal "
    "approximation of the binomial token counts around the load distribution.",
    "Memory: parameters, gradients and both Adam moments in param_dtype, plus a "
    "rough activation estimate; not modelled: fragmentation, XLA temporaries, "
    "data loading, host overheads, stragglers, network congestion from other jobs.",
)

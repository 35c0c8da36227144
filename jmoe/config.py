"""The frozen configuration of one MoE layer, validated before anything compiles."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

ROUTERS = ("softmax_topk", "sigmoid_topk", "switch", "expert_choice", "topk_softmax")
DISPATCHES = ("capacity", "dropless")
ACTIVATIONS = ("swiglu", "geglu", "gelu", "swiglu_clamped")
# Gated MLPs: act(x @ w_gate) * (x @ w_up). "geglu" is Gemma's / T5 v1.1's
# gated GELU with the tanh approximation (Gemma's `nn.gelu` default).
# "swiglu_clamped" is GPT-OSS's: (clip(up) + 1) * g * sigmoid(alpha * g), g = min(gate, limit).
GATED_ACTIVATIONS = ("swiglu", "geglu", "swiglu_clamped")
DROP_POLICIES = ("position", "probability")
CAPACITY_SCOPES = ("shard", "batch")
GMM_BACKENDS = ("auto", "xla", "pallas")
GMM_TILINGS = ("auto", "wide", "narrow")
RAGGED_IMPLS = ("auto", "native", "dense")
CAPACITY_LAYOUTS = ("auto", "dense", "packed")


GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def resolve_gmm_backend(name: str, platform: str) -> str:
    """The grouped-matmul implementation `name` means on `platform`
    (`jax.default_backend()`): `auto` is Pallas/Triton on GPUs, XLA elsewhere."""
    if name not in GMM_BACKENDS:
        raise ValueError(f"backend={name!r} is invalid: choose one of {GMM_BACKENDS}")
    if name == "auto":
        return "pallas" if platform in GPU_PLATFORMS else "xla"
    return name


DTYPES = ("float32", "bfloat16", "float16")


def dtype_name(value: Any) -> Any:
    """'bfloat16' for `jnp.bfloat16`, `np.dtype('bfloat16')` or 'bfloat16':
    Flax code passes dtypes as types; configs store their names. Anything
    without a name comes back unchanged for the check to reject."""
    if isinstance(value, str):
        return value
    name = getattr(value, "name", None)  # a numpy dtype
    if not isinstance(name, str):
        name = getattr(value, "__name__", None)  # a scalar type: jnp.bfloat16, np.float32
    return name if isinstance(name, str) else value


def mlp_matrices(activation: str) -> int:
    """Weight matrices of one MLP: 3 for gated ones (gate, up, down), else 2."""
    return 3 if activation in GATED_ACTIVATIONS else 2


class FieldError(ValueError):
    """A config field that cannot work: names the field, its value and the fix.

    `owner` is where the user sets the field (`MoEConfig`, `config.model`, ...);
    `under(owner)` re-raises the same check for another owner, so every check
    is written once and reads right wherever it is reached.
    """

    def __init__(self, owner: str, field: str, value: Any, fix: str):
        super().__init__(f"{owner}.{field}={value!r} is invalid: {fix}")
        self.owner, self.field, self.value, self.fix = owner, field, value, fix

    def under(self, owner: str) -> "FieldError":
        return FieldError(owner, self.field, self.value, self.fix)


def _fail(field: str, value: Any, fix: str, owner: str = "MoEConfig") -> None:
    raise FieldError(owner, field, value, fix)


def from_section(cls, section, owner: str):
    """`cls(**section)` for a config section (a dict or ConfigDict; None =
    the defaults); an unknown key raises FieldError naming the known ones."""
    if section is None:
        return cls()
    d = dict(section)
    known = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in known:
            raise FieldError(owner, k, d[k], f"unknown field; the fields are {sorted(known)}.")
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class Execution:
    """How one MoE layer runs: never what it computes.

    Every field is math-identical: any value gives the same outputs and
    gradients (to float rounding), so these may change between runs of one
    checkpoint, per call, or at run time.

      gmm_backend: grouped-matmul implementation, `auto` (Pallas/Triton on
        GPU, XLA elsewhere), `xla` or `pallas`.
      gmm_tiling: the Pallas grouped matmul's shipped tiling
        (`jmoe.kernels.PALLAS_TILINGS`): `auto` by the operands' shape (wide
        when min(I, N) >= 256), or `wide` / `narrow` for every matmul. The
        xla backend has one tiling and ignores it.
      a2a_hierarchy: devices per node group for Tutel's two-level (2DH)
        all-to-all: first within groups of this many consecutive devices on the
        `expert` axis, then across groups. 0 or 1 = one flat all-to-all.
      ragged_impl: how the dropless path exchanges variable-size slices:
        `native` = `lax.ragged_all_to_all` (GPU/TPU), `dense` = a padded dense
        all-to-all with identical results (any backend, XLA:CPU included),
        `auto` = native where the backend implements it.
      ep_buckets: with the dense emulation of the ragged all-to-all (CPU, or
        a two-level all-to-all), smaller dropless exchange buffers to try
        before the worst-case one, as multiples of the balanced load per
        (source, destination) device pair, T_local*K/EP rows. At run time
        every device takes the smallest bucket that holds the busiest pair
        anywhere on the mesh (one scalar all-reduce), so results equal the
        worst-case buffer's and nothing drops; a balanced router moves and
        regroups ~1.5x the minimum instead of EP x. Each bucket compiles one
        more copy of the exchange, and the backward recomputes the bucket
        taken (rematerialisation). () = always the worst-case buffer. The native
        ragged all-to-all (GPU) ignores it: it moves only the real rows.
      overlap_chunks: splits each shard's dispatched tokens into this many
        chunks whose all-to-alls and expert compute are independent, so the
        scheduler can overlap chunk i+1's all-to-all with chunk i's experts
        (Tutel's overlap degree).
      collective_matmul: with expert tensor parallelism (a `tensor` mesh axis
        > 1) on the capacity path, the down-projection's all-reduce becomes a
        ring of ppermutes overlapped with the matmul (reduce-scatter) plus an
        all-gather.
      capacity_buckets: with a dynamic capacity (`MoEConfig.capacity_factor`
        <= 0), the capacities compiled besides the largest, as multiples of
        the balanced load T*K/E; each step runs the smallest that holds the
        busiest expert (`jax.lax.switch`, one scalar max over the mesh), so
        a step never recompiles. () = always the largest. Used by the
        `dense` capacity layout only.
      capacity_layout: how the expert-parallel capacity path exchanges its
        rows. `dense`: fixed [E, C] buffers through `lax.all_to_all`
        (GShard; with a dynamic capacity, `capacity_buckets` size them).
        `packed`: only the kept rows, through the dropless exchange (its
        `ep_buckets` size the buffers), so a capacity costs what its kept
        rows cost and a dynamic capacity (which only bounds what drops)
        never pays for padding. The same rows are kept either way. `auto`:
        packed for a dynamic capacity (`capacity_factor <= 0`) or a
        batch-wide one (`MoEConfig.capacity_scope='batch'`) without overlap
        chunks, dense otherwise. One device always packs.
      shadow_experts: FasterMoE's shadow experts on the expert-parallel
        dropless path: each step, the `s` experts with the most assignments on
        the whole mesh are computed on every device for that device's own
        tokens (their weights gathered, their gradients summed back to the
        owner) instead of sending those tokens (`jmoe.sharding.shadow`).
        0 = off.
    """

    gmm_backend: str = "auto"
    gmm_tiling: str = "auto"
    a2a_hierarchy: int = 0
    ragged_impl: str = "auto"
    ep_buckets: tuple = (1.5, 3.0)
    overlap_chunks: int = 1
    collective_matmul: bool = False
    capacity_buckets: tuple = (1.25, 1.5, 2.0, 3.0)
    capacity_layout: str = "auto"
    shadow_experts: int = 0

    def __post_init__(self):
        self.validate()
        # Hashable and canonical (configs arrive with lists from ml_collections).
        object.__setattr__(self, "ep_buckets", tuple(float(f) for f in self.ep_buckets))
        object.__setattr__(self, "capacity_buckets",
                           tuple(float(f) for f in self.capacity_buckets))

    def validate(self, owner: str = "Execution") -> None:
        if self.gmm_backend not in GMM_BACKENDS:
            _fail("gmm_backend", self.gmm_backend, f"choose one of {GMM_BACKENDS}.", owner)
        if self.gmm_tiling not in GMM_TILINGS:
            _fail("gmm_tiling", self.gmm_tiling, f"choose one of {GMM_TILINGS}.", owner)
        if self.ragged_impl not in RAGGED_IMPLS:
            _fail("ragged_impl", self.ragged_impl, f"choose one of {RAGGED_IMPLS}.", owner)
        if not isinstance(self.a2a_hierarchy, int) or self.a2a_hierarchy < 0:
            _fail("a2a_hierarchy", self.a2a_hierarchy,
                  "must be an integer >= 0 (0 = flat all-to-all).", owner)
        b = self.ep_buckets
        if not isinstance(b, (tuple, list)) or any(
                not isinstance(f, (int, float)) or f < 1 for f in b) or list(b) != sorted(set(b)):
            _fail("ep_buckets", b, "must be a tuple of increasing factors >= 1.0, e.g. "
                  "(1.5, 3.0); () turns the buckets off.", owner)
        if not isinstance(self.overlap_chunks, int) or self.overlap_chunks < 1:
            _fail("overlap_chunks", self.overlap_chunks,
                  "must be an integer >= 1 (1 = no chunking).", owner)
        if not isinstance(self.collective_matmul, bool):
            _fail("collective_matmul", self.collective_matmul, "must be True or False.", owner)
        c = self.capacity_buckets
        if not isinstance(c, (tuple, list)) or any(
                not isinstance(f, (int, float)) or f <= 0 for f in c) or list(c) != sorted(set(c)):
            _fail("capacity_buckets", c, "must be a tuple of increasing factors > 0, e.g. "
                  "(1.25, 1.5, 2.0, 3.0); () = always the largest capacity.", owner)
        if self.capacity_layout not in CAPACITY_LAYOUTS:
            _fail("capacity_layout", self.capacity_layout,
                  f"choose one of {CAPACITY_LAYOUTS}.", owner)
        if not isinstance(self.shadow_experts, int) or self.shadow_experts < 0:
            _fail("shadow_experts", self.shadow_experts,
                  "must be an integer >= 0 (0 = no shadow experts).", owner)

    def ragged(self, backend: str) -> str:
        """The dropless exchange on `backend` (`jax.default_backend()`):
        `native` ragged all-to-all or its `dense` emulation."""
        if self.ragged_impl != "auto":
            return self.ragged_impl
        if self.a2a_hierarchy > 1:
            return "dense"  # the two-level exchange is built from dense all-to-alls
        return "native" if backend in GPU_PLATFORMS + ("tpu",) else "dense"

    def replace(self, **kw) -> "Execution":
        return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Everything that defines one MoE layer.

    Shapes follow the alphabet in `jmoe/__init__.py`: D = `d_model`,
    F = `d_ff` (hidden size of one expert), E = `num_experts`, K = `top_k`.

    Router options:
      router: `softmax_topk` (Mixtral / Qwen-MoE), `sigmoid_topk` (DeepSeek-V3:
        sigmoid scores, a per-expert bias used for selection only, optional
        group-limited top-k), `switch` (top-1 softmax, Switch Transformer) or
        `expert_choice` (each expert takes its top-C tokens).
      renormalize: renormalise the K chosen weights to sum to one.
      n_group, topk_group: group-limited routing for `sigmoid_topk`: experts
        are split into `n_group` groups and only the best `topk_group` groups
        are eligible for each token (0 disables).
      routed_scaling_factor: multiplies the routed weights (DeepSeek-V3).
      bias_update_rate: step size of the aux-loss-free bias update.
      jitter_eps: multiplicative uniform noise on router inputs when training.
      `topk_softmax` (GPT-OSS): top-k over the raw logits, then a softmax over
        the k chosen logits only.
      router_bias: a learned per-expert bias added to the router logits
        (GPT-OSS; `params["router"]["b_E"]`); only with `topk_softmax`.

    Expert options:
      expert_bias: learned biases on the experts' projections (GPT-OSS;
        `b_gate_EF`, `b_up_EF`, `b_down_ED` next to the expert weights).
      swiglu_alpha, swiglu_limit: the `swiglu_clamped` activation's sigmoid
        slope and clamp (GPT-OSS: 1.702 and 7.0).

    Dispatch options:
      dispatch: `capacity` (static `[E, C, D]` buffers, may drop) or
        `dropless` (sort by expert + grouped matmul, never drops).
      capacity_factor: C = ceil(capacity_factor * T * K / E), at least
        `min_capacity`; 0 = what each call needs (nothing drops), -x = what
        each call needs up to x (Tutel's rule; docs/adaptive.md).
      drop_policy: which assignments lose when an expert overflows:
        `position` (top-1 choices first, then earlier tokens, as in GShard) or
        `probability` (higher routing weight first, batch-prioritised routing).
      capacity_scope: what a capacity C counts over when tokens are sharded
        (expert parallelism). `shard`: each token shard has C per expert for
        its own T_local tokens (GShard's groups), so a shard whose share of an
        expert runs over C drops rows even when the expert as a whole has
        room. `batch`: C = ceil(capacity_factor * T * K / E) over all T tokens
        of the call, ranked in the one-device order (top-1 choices first,
        then token order across shards), so the layer drops exactly what it
        drops on one device; each shard learns the earlier shards' counts
        from one small all-gather. Needs `drop_policy='position'` and a fixed
        capacity_factor > 0; runs the packed capacity layout unless
        `execution.capacity_layout='dense'` (whose buffers then hold C rows
        per expert from every shard). One device: both are the same.
      group_align: the dropless path pads every expert's rows to a multiple of
        this, so grouped-matmul tiles never straddle two experts.

    Expert-parallel maths (used when the mesh has an `expert` axis > 1):
      ep_recv_factor: caps the dropless receive buffer at
        ceil(ep_recv_factor * local assignments) rows per device; 0 sizes it
        for the worst case (every token to this device). Assignments that do
        not fit are dropped and reported in `dropped_fraction`, never silently.

    dtype: the compute dtype; None = the input's (`x.dtype`). param_dtype:
      the weights' dtype.
    execution: how the layer runs (`Execution`); never changes what it computes.
    """

    d_model: int
    d_ff: int
    num_experts: int = 8
    top_k: int = 2
    activation: str = "swiglu"
    router: str = "softmax_topk"
    renormalize: bool = True
    n_group: int = 0
    topk_group: int = 0
    routed_scaling_factor: float = 1.0
    bias_update_rate: float = 1e-3
    jitter_eps: float = 0.0
    dispatch: str = "dropless"
    capacity_factor: float = 1.25
    min_capacity: int = 4
    drop_policy: str = "position"
    capacity_scope: str = "shard"
    group_align: int = 128
    num_shared_experts: int = 0
    shared_d_ff: int = 0
    shared_gate: bool = False
    router_bias: bool = False
    expert_bias: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    ep_recv_factor: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    execution: Execution = Execution()

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):
            object.__setattr__(self, name, dtype_name(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the field, the value and the fix."""
        for name in ("d_model", "d_ff", "num_experts", "top_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                _fail(name, v, "must be a positive integer.")
        if self.router not in ROUTERS:
            _fail("router", self.router, f"choose one of {ROUTERS}.")
        if self.dispatch not in DISPATCHES:
            _fail("dispatch", self.dispatch, f"choose one of {DISPATCHES}.")
        if self.activation not in ACTIVATIONS:
            _fail("activation", self.activation, f"choose one of {ACTIVATIONS}.")
        if self.drop_policy not in DROP_POLICIES:
            _fail("drop_policy", self.drop_policy, f"choose one of {DROP_POLICIES}.")
        if self.capacity_scope not in CAPACITY_SCOPES:
            _fail("capacity_scope", self.capacity_scope, f"choose one of {CAPACITY_SCOPES}.")
        if self.capacity_scope == "batch":
            # The batch-wide rank is a count of earlier shards' rows: it
            # exists for the position order, not for a weight order (that
            # would need a sort over the whole batch).
            if self.dispatch != "capacity" or self.router == "expert_choice":
                _fail("capacity_scope", "batch", "a batch-wide capacity applies to "
                      "dispatch='capacity' with a token-choice router; set "
                      "capacity_scope='shard'.")
            if self.drop_policy != "position":
                _fail("capacity_scope", "batch", "the batch-wide capacity ranks rows in the "
                      "position order: set drop_policy='position' or capacity_scope='shard'.")
            if not self.capacity_factor > 0:
                _fail("capacity_scope", "batch", "the batch-wide capacity is a fixed "
                      "capacity_factor > 0 (a dynamic capacity already sizes the buffers to "
                      "the busiest expert of the mesh): set capacity_scope='shard'.")
        if self.ep_recv_factor < 0:
            _fail("ep_recv_factor", self.ep_recv_factor, "must be >= 0 (0 = worst-case buffer).")
        if not isinstance(self.execution, Execution):
            _fail("execution", self.execution, "must be a jmoe.Execution(...).")
        shadows = self.execution.shadow_experts
        if shadows and (self.dispatch != "dropless" or self.router == "expert_choice"):
            _fail("shadow_experts", shadows, "shadow experts run on the dropless path of a "
                  "token-choice router: set dispatch='dropless', or shadow_experts=0.",
                  "Execution")
        if shadows > self.num_experts:
            _fail("shadow_experts", shadows,
                  f"at most num_experts={self.num_experts} experts can be shadowed.", "Execution")
        if self.top_k > self.num_experts:
            _fail("top_k", self.top_k,
                  f"top_k cannot exceed num_experts={self.num_experts}; lower top_k "
                  "or add experts.")
        if self.router == "softmax_topk" and self.top_k == 1 and self.renormalize:
            _fail("renormalize", self.renormalize,
                  "with top_k=1 the renormalised weight is always 1.0, so the router "
                  "gets no gradient: set renormalize=False (or router='switch').")
        if self.router == "switch" and self.top_k != 1:
            _fail("top_k", self.top_k, "the 'switch' router is top-1: set top_k=1.")
        if self.router == "expert_choice" and self.dispatch != "capacity":
            _fail("dispatch", self.dispatch,
                  "expert_choice routing fills a fixed capacity per expert: set "
                  "dispatch='capacity'.")
        if self.router == "expert_choice" and not (self.capacity_factor > 0):
            _fail("capacity_factor", self.capacity_factor,
                  "expert_choice fills a fixed capacity per expert: must be > 0 "
                  "(1.0-1.25 is typical).")
        if self.dispatch == "capacity" and not math.isfinite(self.capacity_factor):
            _fail("capacity_factor", self.capacity_factor,
                  "must be a finite number: > 0 fixed (1.0-1.25 is typical), 0 = what each "
                  "step needs, -x = what each step needs up to x.")
        if self.min_capacity < 0:
            _fail("min_capacity", self.min_capacity, "must be >= 0.")
        if self.group_align <= 0:
            _fail("group_align", self.group_align, "must be a positive integer (1 = no padding).")
        if self.n_group or self.topk_group:
            if self.router != "sigmoid_topk":
                _fail("n_group", self.n_group,
                      "group-limited routing is only defined for router='sigmoid_topk'.")
            if self.n_group <= 0 or self.num_experts % self.n_group:
                _fail("n_group", self.n_group,
                      f"must divide num_experts={self.num_experts}.")
            if not 0 < self.topk_group <= self.n_group:
                _fail("topk_group", self.topk_group, f"must be in [1, n_group={self.n_group}].")
            if self.topk_group * (self.num_experts // self.n_group) < self.top_k:
                _fail("topk_group", self.topk_group,
                      "the eligible groups hold fewer experts than top_k: raise topk_group.")
        if self.routed_scaling_factor <= 0:
            _fail("routed_scaling_factor", self.routed_scaling_factor, "must be > 0.")
        if self.jitter_eps < 0:
            _fail("jitter_eps", self.jitter_eps, "must be >= 0 (0 disables jitter).")
        if self.router_bias and self.router != "topk_softmax":
            _fail("router_bias", self.router_bias, "a learned router bias is implemented for "
                  "router='topk_softmax' (GPT-OSS) only; set router_bias=False.")
        if self.expert_bias and self.activation not in GATED_ACTIVATIONS:
            _fail("expert_bias", self.expert_bias, "expert biases need a gated activation "
                  f"({GATED_ACTIVATIONS}); set expert_bias=False.")
        if not self.swiglu_limit > 0:
            _fail("swiglu_limit", self.swiglu_limit, "must be > 0 (GPT-OSS uses 7.0).")
        if (self.execution.capacity_layout == "packed" and self.dispatch == "capacity"
                and self.execution.overlap_chunks > 1):
            # Chunks of tokens would each get their own capacity: other drops.
            _fail("capacity_layout", "packed", "the packed capacity layout runs without "
                  "overlap chunks: set execution.overlap_chunks=1 or capacity_layout='dense'.",
                  "Execution")
        if self.num_shared_experts < 0:
            _fail("num_shared_experts", self.num_shared_experts, "must be >= 0.")
        if self.num_shared_experts and self.shared_d_ff < 0:
            _fail("shared_d_ff", self.shared_d_ff, "must be >= 0 (0 means d_ff).")
        for name in ("dtype", "param_dtype"):
            if name == "dtype" and self.dtype is None:
                continue  # follow the input
            if getattr(self, name) not in DTYPES:
                _fail(name, getattr(self, name), f"choose one of {DTYPES} (a name or "
                      "jnp.float32 / jnp.bfloat16 / jnp.float16).")

    def capacity(self, num_tokens: int, num_groups: int = 0) -> int:
        """Slots per expert for `num_tokens` tokens (a static Python int); with
        a dynamic capacity (capacity_factor <= 0), the largest it may take.

        `num_groups`: the buffers the assignments spread over when the
        capacity is not set per expert (default: `num_experts`)."""
        return self.capacity_choices(num_tokens, num_groups)[-1]

    @property
    def packed_capacity(self) -> bool:
        """The expert-parallel capacity path exchanges only the kept rows
        (`Execution.capacity_layout`; `auto`: for a dynamic capacity)."""
        layout = self.execution.capacity_layout
        if layout == "auto":
            # A batch-wide capacity in dense [E, C] buffers would hold C rows
            # per expert from every shard: packed sends only what is kept.
            return ((self.dynamic_capacity or self.batch_capacity)
                    and self.execution.overlap_chunks == 1)
        return self.dispatch == "capacity" and layout == "packed"

    @property
    def batch_capacity(self) -> bool:
        """The capacity counts over the whole batch (`capacity_scope='batch'`)."""
        return self.dispatch == "capacity" and self.capacity_scope == "batch"

    @property
    def dynamic_capacity(self) -> bool:
        """capacity_factor = 0 (what each step needs) or -x (up to x): Tutel's rule."""
        return self.dispatch == "capacity" and self.capacity_factor <= 0

    def capacity_choices(self, num_tokens: int, num_groups: int = 0) -> list:
        """The capacities a step may use, smallest first (static ints): one for
        a fixed factor; with a dynamic one, `execution.capacity_buckets` below
        the largest, which is every token (factor 0: nothing ever drops) or
        x times the balanced load (factor -x)."""
        per = num_tokens * self.top_k / (num_groups or self.num_experts)
        floor = max(self.min_capacity, 1)
        if self.capacity_factor > 0:
            return [max(math.ceil(self.capacity_factor * per), floor)]
        # An expert (or slot) gets at most one assignment per token.
        top = num_tokens if self.capacity_factor == 0 else min(
            num_tokens, math.ceil(-self.capacity_factor * per))
        top = max(top, floor)
        below = {max(math.ceil(f * per), floor) for f in self.execution.capacity_buckets}
        return sorted(c for c in below if c < top) + [top]

    def recv_buffer_rows(self, local_assignments: int, ep: int) -> int:
        """Rows of the dropless receive buffer on `ep` expert-parallel devices
        when each shard has `local_assignments` (T_local*K): the worst case
        (every assignment to one device), or the `ep_recv_factor` cap."""
        worst = ep * local_assignments
        if self.ep_recv_factor > 0:
            return max(1, min(worst, math.ceil(self.ep_recv_factor * local_assignments)))
        return worst

    def ep_bucket_slots(self, local_assignments: int, ep: int) -> list:
        """Per-pair slot rows of the `execution.ep_buckets` exchanges, smallest first
        (multiples of 8); only those smaller than the fallback buffer."""
        fallback = self.recv_buffer_rows(local_assignments, ep)
        out = []
        for f in self.execution.ep_buckets:
            slot = -(-math.ceil(f * local_assignments / ep) // 8) * 8
            if ep * slot < fallback and slot < local_assignments and slot not in out:
                out.append(slot)
        return out

    @property
    def expert_matrices(self) -> int:
        """Weight matrices of one expert MLP (`mlp_matrices`)."""
        return mlp_matrices(self.activation)

    @property
    def shared_hidden(self) -> int:
        return self.num_shared_experts * (self.shared_d_ff or self.d_ff)

    def replace(self, **kw) -> "MoEConfig":
        return dataclasses.replace(self, **kw)

    def with_execution(self, **kw) -> "MoEConfig":
        """The same layer run another way: `cfg.with_execution(overlap_chunks=2)`."""
        return dataclasses.replace(self, execution=self.execution.replace(**kw))

    def maths(self) -> "MoEConfig":
        """This config with the default `Execution`: two configs with equal
        `maths()` compute the same function."""
        return dataclasses.replace(self, execution=Execution())

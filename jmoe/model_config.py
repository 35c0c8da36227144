"""What a GPT-MoE computes and how it runs: `GPTConfig`, built from the
trainer's `config.model` and `config.execution` by `from_config`, and the
parameter and FLOP counts that follow from its shapes alone.

The planner and the trainer read these without building the model.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping, Optional

from jmoe.config import DTYPES, Execution, FieldError, MoEConfig, dtype_name, mlp_matrices

REMAT = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class ModelExecution:
    """How the model runs, never what it computes (with `MoEConfig.execution`,
    the fields that may change between runs of one checkpoint).

      remat: recompute each block's activations in the backward pass:
        `none`, `full`, or `dots` (keep matmul outputs).
      lancet_chunks: Lancet-style overlap: the work around each MoE (attention
        output projection, residual, norm, router, experts) runs in this many
        token chunks along T, so chunk j's all-to-all can overlap chunk j+1's
        compute (dropless dispatch, no router jitter).
      fsdp_collective_matmul: with `config.mesh.fsdp` on a mesh whose 'data'
        axis is > 1, the attention q/k/v/o, dense-FFN and unembedding
        projections pass their weight shards round 'data' with `ppermute`,
        each step multiplying by the block already present
        (`jmoe.sharding.fsdp`); plain einsums otherwise.
    """

    remat: str = "none"
    lancet_chunks: int = 1
    fsdp_collective_matmul: bool = False

    def __post_init__(self):
        def fail(field, value, fix):
            raise FieldError("ModelExecution", field, value, fix)

        if self.remat not in REMAT:
            fail("remat", self.remat, f"choose one of {REMAT}.")
        if not isinstance(self.lancet_chunks, int) or self.lancet_chunks < 1:
            fail("lancet_chunks", self.lancet_chunks, "must be an integer >= 1 (1 = off).")
        if not isinstance(self.fsdp_collective_matmul, bool):
            fail("fsdp_collective_matmul", self.fsdp_collective_matmul,
                 "must be a bool: true or false.")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """What the model computes; built from `config.model` (and how it runs,
    `execution`, from `config.execution`) by `from_config`."""

    vocab_size: int = 256
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 0  # 0: = num_heads (MHA); fewer: grouped-query attention
    head_dim: int = 0  # 0: d_model // num_heads
    dense_d_ff: int = 0  # hidden of the dense-FFN layers; 0: top_k*d_ff + shared hidden
    moe_every: int = 1  # 0: no MoE layer at all
    first_dense_layers: int = 0
    dense: bool = False
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    # ScMoE (architecture variant, changes the model): an MoE layer's experts
    # read the block's input (normed, before attention) through a shortcut,
    # while a dense MLP of one expert's size reads the current representation;
    # both outputs are added. The all-to-all then has the attention to hide behind.
    scmoe: bool = False
    # Run the blocks under `jax.lax.scan` over parameters stacked per group of
    # layers that share a shape (`jmoe.model.scan_groups`): compile time no
    # longer grows with depth. The same function and the same initial
    # weights, but another parameter layout, so a checkpoint keeps its value.
    scan_layers: bool = False
    moe: Optional[MoEConfig] = None  # None when no layer is an MoE layer
    execution: ModelExecution = ModelExecution()

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):  # jnp.bfloat16 -> "bfloat16"
            object.__setattr__(self, name, dtype_name(getattr(self, name)))

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def active_d_ff(self) -> int:
        """Hidden size of a dense MLP with an MoE layer's active expert parameters."""
        m = self.moe
        return m.top_k * m.d_ff + m.shared_hidden

    @property
    def dense_hidden(self) -> int:
        if self.dense_d_ff:
            return self.dense_d_ff
        if self.moe is None:
            raise ValueError("config.model.dense_d_ff=0 needs MoE fields to derive a size: "
                             "set dense_d_ff > 0.")
        return self.active_d_ff

    @property
    def activation(self) -> str:
        return self.moe.activation if self.moe is not None else "swiglu"

    def is_moe_layer(self, i: int) -> bool:
        if self.dense or self.moe is None or self.moe_every <= 0 or i < self.first_dense_layers:
            return False
        return (i - self.first_dense_layers + 1) % self.moe_every == 0

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

    def validate(self) -> None:
        def fail(field, value, fix):
            raise FieldError("GPTConfig", field, value, fix)

        for f in ("vocab_size", "d_model", "num_layers", "num_heads"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                fail(f, v, "must be a positive integer.")
        for f in ("num_kv_heads", "head_dim", "dense_d_ff", "moe_every", "first_dense_layers"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 0:
                fail(f, v, "must be an integer >= 0.")
        if not isinstance(self.scan_layers, bool):
            fail("scan_layers", self.scan_layers, "must be a bool: true or false.")
        if not self.head_dim and self.d_model % self.num_heads:
            fail("num_heads", self.num_heads,
                 f"must divide d_model={self.d_model} (or set head_dim).")
        if self.num_heads % self.kv_heads:
            fail("num_kv_heads", self.num_kv_heads,
                 f"must divide num_heads={self.num_heads}.")
        if self.head_size % 2:
            fail("head_dim", self.head_size, "rotary embeddings need an even head size.")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in DTYPES:
                fail(f, getattr(self, f), f"choose one of {DTYPES}.")
        if self.rope_theta <= 0:
            fail("rope_theta", self.rope_theta, "must be > 0.")
        if not isinstance(self.execution, ModelExecution):
            fail("execution", self.execution, "must be a ModelExecution(...).")
        if self.execution.lancet_chunks > 1 and self.moe is not None:
            # Lancet chunks along T are math-identical only where a chunk's
            # routing cannot differ from the whole sequence's.
            ex = lambda fix: FieldError("ModelExecution", "lancet_chunks",
                                        self.execution.lancet_chunks, fix)
            if self.moe.dispatch != "dropless":
                raise ex("token chunks change each chunk's capacity: use dispatch='dropless' "
                         "or lancet_chunks=1.")
            if self.moe.jitter_eps > 0:
                raise ex("router jitter draws differ per chunk: set jitter_eps=0 or "
                         "lancet_chunks=1.")


def _split(section: Mapping[str, Any], owner: str, *types) -> list[dict]:
    """Splits a flat config section over dataclass `types` by field name;
    an unknown key names itself and the known ones."""
    names = [{f.name for f in dataclasses.fields(t)} for t in types]
    known = set().union(*names)
    unknown = sorted(set(section) - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"{owner}.{unknown[0]} is not a field of {owner}: {hint}known fields "
                         f"are {sorted(known)}.")
    return [{k: v for k, v in section.items() if k in n} for n in names]


def from_config(model_cfg: Mapping[str, Any],
                execution_cfg: Optional[Mapping[str, Any]] = None) -> GPTConfig:
    """`GPTConfig` from the flat `config.model` (GPT and MoE fields: what the
    model computes) and `config.execution` (model and layer execution
    fields: how it runs). Errors name the fields as the user sets them."""
    gpt_kw, moe_kw = _split(dict(model_cfg), "config.model", GPTConfig, MoEConfig)
    model_ex, layer_ex = _split(dict(execution_cfg or {}), "config.execution", ModelExecution,
                                Execution)
    for k in ("moe", "execution"):
        if k in gpt_kw:
            raise ValueError(f"config.model.{k} is set by from_config: remove it.")
    for k in ("d_model", "dtype", "param_dtype", "execution"):
        moe_kw.pop(k, None)
    try:
        execution = Execution(**layer_ex)
        mexec = ModelExecution(**model_ex)
    except FieldError as e:
        raise e.under("config.execution") from None
    try:
        base = GPTConfig(**gpt_kw, execution=mexec)
        moe = None
        if "d_ff" in moe_kw and base.moe_every > 0:
            moe = MoEConfig(d_model=base.d_model, dtype=base.dtype, param_dtype=base.param_dtype,
                            execution=execution, **moe_kw)
        out = dataclasses.replace(base, moe=moe)
        out.validate()
    except FieldError as e:
        where = "config.execution" if e.owner in ("ModelExecution", "Execution") else "config.model"
        raise e.under(where) from None
    return out


# ---------------------------------------------------------- counting ----

def param_count_formula(cfg: GPTConfig) -> dict[str, int]:
    """Total and active parameter counts from the shapes alone.

    `active` counts the weights one token touches: the top-k routed experts,
    shared experts and the router in MoE layers; everything else in full.
    """
    d, v, h, j, k = cfg.d_model, cfg.vocab_size, cfg.num_heads, cfg.kv_heads, cfg.head_size
    mats = mlp_matrices(cfg.activation)
    attn = d * h * k + 2 * d * j * k + h * k * d + 2 * d  # + the two norms' scales
    dense_ffn = mats * d * cfg.dense_hidden
    total = active = 0
    for i in range(cfg.num_layers):
        total += attn
        active += attn
        if cfg.is_moe_layer(i):
            m = cfg.moe
            router = d * m.num_experts
            shared = mats * d * m.shared_hidden + (d if m.shared_gate and m.num_shared_experts
                                                  else 0)
            total += router + m.num_experts * mats * d * m.d_ff + shared
            active += router + m.top_k * mats * d * m.d_ff + shared
            if cfg.scmoe:  # the dense MLP beside the shortcut-fed experts
                total += mats * d * m.d_ff
                active += mats * d * m.d_ff
        else:
            total += dense_ffn
            active += dense_ffn
    emb = v * d + d + (0 if cfg.tie_embeddings else d * v)
    return {"total": total + emb, "active": active + emb}


def flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward).

    6 x (active matmul weights, embedding lookup excluded, unembedding
    included) + 12 x layers x T x heads x head_dim for attention scores and
    values, counted in full as in the PaLM MFU convention.
    """
    counts = param_count_formula(cfg)
    matmul = counts["active"] - cfg.vocab_size * cfg.d_model
    if cfg.tie_embeddings:
        matmul += cfg.vocab_size * cfg.d_model
    attn = 12 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_size
    return 6.0 * matmul + attn

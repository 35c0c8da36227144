"""A decoder-only GPT whose FFNs are jmoe MoE layers.

    pre-norm block:  x += Attention(RMSNorm(x));  x += FFN(RMSNorm(x))

Attention is causal multi-head (or grouped-query) attention with rotary
position embeddings. The FFN of layer i is an MoE layer when
`i >= first_dense_layers` and `(i - first_dense_layers + 1) % moe_every == 0`,
else a dense SwiGLU/GELU MLP. `dense=True` replaces every MoE FFN by a dense
MLP of hidden size `top_k * d_ff + shared_hidden`: the same active expert
parameters and FLOPs per token, without the router (D*E parameters) and
without the other experts -- the baseline an MoE has to beat.

Parameters are stored in `param_dtype` and cast to `dtype` for compute; the
loss is computed in float32.

Shapes: B batch, T sequence, D d_model, H query heads, J key/value heads,
K head dim, F hidden, V vocab (see the legend in `jmoe/__init__.py`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jmoe import experts
from jmoe.config import MoEConfig
from jmoe.moe import MoE, combine_aux
from jmoe.sharding import fsdp
from jmoe.sharding.expert_parallel import chunk_bounds

REMAT = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Shape and numerics of the model; built from `config.model` by `from_config`."""

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
    remat: str = "none"
    # Lancet-style overlap: the work around each MoE (attention output
    # projection, residual, norm, router, experts) runs in this many token
    # chunks along T, so chunk j's all-to-all can overlap chunk j+1's
    # compute. Math-identical (dropless dispatch, no router jitter).
    lancet_chunks: int = 1
    # ScMoE (architecture variant, changes the model): an MoE layer's experts
    # read the block's input (normed, before attention) through a shortcut,
    # while a dense MLP of one expert's size reads the current representation;
    # both outputs are added. The all-to-all then has the attention to hide behind.
    scmoe: bool = False
    # FSDP weights gathered as ring collective matmuls: with config.mesh.fsdp
    # on a mesh whose 'data' axis is > 1, the attention q/k/v/o, dense-FFN and
    # unembedding projections pass their weight shards round 'data' with
    # `ppermute`, each step multiplying by the block already present
    # (jmoe.sharding.fsdp). Math-identical; plain einsums otherwise.
    fsdp_collective_matmul: bool = False
    moe: Optional[MoEConfig] = None  # None when no layer is an MoE layer

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
            raise ValueError(f"config.model.{field}={value!r} is invalid: {fix}")

        for f in ("vocab_size", "d_model", "num_layers", "num_heads"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                fail(f, v, "must be a positive integer.")
        for f in ("num_kv_heads", "head_dim", "dense_d_ff", "moe_every", "first_dense_layers"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 0:
                fail(f, v, "must be an integer >= 0.")
        if not self.head_dim and self.d_model % self.num_heads:
            fail("num_heads", self.num_heads,
                 f"must divide d_model={self.d_model} (or set head_dim).")
        if self.num_heads % self.kv_heads:
            fail("num_kv_heads", self.num_kv_heads,
                 f"must divide num_heads={self.num_heads}.")
        if self.head_size % 2:
            fail("head_dim", self.head_size, "rotary embeddings need an even head size.")
        if self.remat not in REMAT:
            fail("remat", self.remat, f"choose one of {REMAT}.")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in DTYPES:
                fail(f, getattr(self, f), f"choose one of {DTYPES}.")
        if not isinstance(self.fsdp_collective_matmul, bool):
            fail("fsdp_collective_matmul", self.fsdp_collective_matmul,
                 "must be a bool: --config.model.fsdp_collective_matmul=true or false.")
        if self.rope_theta <= 0:
            fail("rope_theta", self.rope_theta, "must be > 0.")
        if not isinstance(self.lancet_chunks, int) or self.lancet_chunks < 1:
            fail("lancet_chunks", self.lancet_chunks, "must be an integer >= 1 (1 = off).")
        if self.lancet_chunks > 1 and self.moe is not None:
            if self.moe.dispatch != "dropless":
                fail("lancet_chunks", self.lancet_chunks,
                     "token chunks change each chunk's capacity: use dispatch='dropless' "
                     "or lancet_chunks=1.")
            if self.moe.jitter_eps > 0:
                fail("lancet_chunks", self.lancet_chunks,
                     "router jitter draws differ per chunk: set jitter_eps=0 or lancet_chunks=1.")


def from_config(model_cfg: Mapping[str, Any]) -> GPTConfig:
    """Splits the flat `config.model` into GPT fields and MoEConfig fields.

    Every key must belong to one of the two; the MoE fields are validated by
    `MoEConfig` (its errors name `MoEConfig.<field>`, which is also the name
    under `config.model`).
    """
    cfg = dict(model_cfg)
    gpt_names = {f.name for f in dataclasses.fields(GPTConfig)} - {"moe"}
    moe_names = {f.name for f in dataclasses.fields(MoEConfig)} - {"d_model", "dtype",
                                                                   "param_dtype"}
    unknown = sorted(set(cfg) - gpt_names - moe_names)
    if unknown:
        raise ValueError(f"config.model.{unknown[0]} is not a model field: known fields are "
                         f"{sorted(gpt_names | moe_names)}.")
    gpt = {k: v for k, v in cfg.items() if k in gpt_names}
    moe_kw = {k: v for k, v in cfg.items() if k in moe_names}
    base = GPTConfig(**gpt)
    moe = None
    if "d_ff" in moe_kw and base.moe_every > 0:
        try:
            moe = MoEConfig(d_model=base.d_model, dtype=base.dtype, param_dtype=base.param_dtype,
                            **moe_kw)
        except ValueError as e:  # name the field as the user sets it
            raise ValueError(str(e).replace("MoEConfig.", "config.model.")) from e
    out = dataclasses.replace(base, moe=moe)
    out.validate()
    return out


# ------------------------------------------------------------ layers ----

def _init(std: float):
    return nnx.initializers.truncated_normal(stddev=std)


def _einsum(ring: bool):
    """`jnp.einsum`, or its FSDP ring collective matmul (`fsdp_collective_matmul`)."""
    return fsdp.ring_einsum if ring else jnp.einsum


class RMSNorm(nnx.Module):
    def __init__(self, d: int, eps: float, param_dtype):
        self.scale_D = nnx.Param(jnp.ones((d,), param_dtype))
        self.eps = eps

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x = x_BTD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.scale_D[...].astype(jnp.float32)).astype(x_BTD.dtype)


def rope(x_BTHK: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding on the last axis (split-halves convention)."""
    t, k = x_BTHK.shape[1], x_BTHK.shape[-1]
    freq = theta ** (-jnp.arange(0, k // 2, dtype=jnp.float32) * 2.0 / k)
    ang_TK = jnp.arange(t, dtype=jnp.float32)[:, None] * freq[None, :]
    sin, cos = jnp.sin(ang_TK)[None, :, None, :], jnp.cos(ang_TK)[None, :, None, :]
    x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHK.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        d, h, j, k = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size
        pdt = jnp.dtype(cfg.param_dtype)
        out_std = 1.0 / math.sqrt(h * k) / math.sqrt(2 * cfg.num_layers)
        self.w_q_DHK = nnx.Param(_init(d ** -0.5)(rngs.params(), (d, h, k), pdt))
        self.w_k_DJK = nnx.Param(_init(d ** -0.5)(rngs.params(), (d, j, k), pdt))
        self.w_v_DJK = nnx.Param(_init(d ** -0.5)(rngs.params(), (d, j, k), pdt))
        self.w_o_HKD = nnx.Param(_init(out_std)(rngs.params(), (h, k, d), pdt))
        self.theta = cfg.rope_theta
        self.fsdp_ring = cfg.fsdp_collective_matmul

    def core(self, x_BTD: jax.Array) -> jax.Array:
        """Everything before the output projection: [B, T, D] -> [B, T, H, K]."""
        dt = x_BTD.dtype
        einsum = _einsum(self.fsdp_ring)
        q_BTHK = rope(einsum("btd,dhk->bthk", x_BTD, self.w_q_DHK[...].astype(dt)), self.theta)
        k_BTJK = rope(einsum("btd,djk->btjk", x_BTD, self.w_k_DJK[...].astype(dt)), self.theta)
        v_BTJK = einsum("btd,djk->btjk", x_BTD, self.w_v_DJK[...].astype(dt))
        # jax.nn.dot_product_attention handles grouped-query heads and picks
        # cuDNN flash attention on GPUs that have it.
        o_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BTJK, v_BTJK, is_causal=True)
        return o_BTHK

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        return self.project(self.core(x_BTD))

    def project(self, o_BTHK: jax.Array) -> jax.Array:
        """The output projection (separate so Lancet can chunk it)."""
        return _einsum(self.fsdp_ring)("bthk,hkd->btd", o_BTHK,
                                       self.w_o_HKD[...].astype(o_BTHK.dtype))


class DenseFFN(nnx.Module):
    """One MLP with the same weight names as a shared expert."""

    def __init__(self, d: int, f: int, activation: str, num_layers: int, param_dtype,
                 *, rngs: nnx.Rngs, fsdp_ring: bool = False):
        self.activation = activation
        self.fsdp_ring = fsdp_ring  # GPTConfig.fsdp_collective_matmul
        out_std = f ** -0.5 / math.sqrt(2 * num_layers)
        if activation == "swiglu":
            self.w_gate_DF = nnx.Param(_init(d ** -0.5)(rngs.params(), (d, f), param_dtype))
        self.w_up_DF = nnx.Param(_init(d ** -0.5)(rngs.params(), (d, f), param_dtype))
        self.w_down_FD = nnx.Param(_init(out_std)(rngs.params(), (f, d), param_dtype))

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        w = {k: v[...] for k, v in vars(self).items() if isinstance(v, nnx.Param)}
        return experts.dense_mlp(x_BTD, w, self.activation,
                                 dot=fsdp.ring_dot if self.fsdp_ring else jnp.dot)


def _scale_residual_outputs(layer: MoE, scale: float) -> None:
    """GPT-2 residual scaling for the MoE layer's down projections.

    Every projection that writes into the residual stream (attention output,
    dense FFN, routed and shared experts) starts at 1/sqrt(2 * layers) of its
    fan-in scale, so the MoE and the dense model start from the same scheme.
    """
    for holder, name in ((layer.experts, "w_down_EFD"), (layer.shared, "w_down_FD")):
        if holder is not None and hasattr(holder, name):
            w = getattr(holder, name)
            w[...] = (w[...] * scale).astype(w[...].dtype)


class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, layer: int, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        self.attn = Attention(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        self.is_moe = cfg.is_moe_layer(layer)
        if self.is_moe:
            self.ffn = MoE(cfg.moe, rngs=rngs)
            _scale_residual_outputs(self.ffn, 1.0 / math.sqrt(2 * cfg.num_layers))
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.dense_hidden, cfg.activation, cfg.num_layers,
                                pdt, rngs=rngs, fsdp_ring=cfg.fsdp_collective_matmul)
        self.scmoe = self.is_moe and cfg.scmoe
        if self.scmoe:
            self.shortcut_mlp = DenseFFN(cfg.d_model, cfg.moe.d_ff, cfg.activation,
                                         cfg.num_layers, pdt, rngs=rngs,
                                         fsdp_ring=cfg.fsdp_collective_matmul)
        self.lancet_chunks = cfg.lancet_chunks if self.is_moe and not self.scmoe else 1

    def __call__(self, x_BTD: jax.Array, train: bool, rng: Optional[jax.Array]):
        if not self.is_moe:
            x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD))
            return x_BTD + self.ffn(self.ffn_norm(x_BTD)), None
        if self.scmoe:
            return self._scmoe(x_BTD, train, rng)
        o_BTHK = self.attn.core(self.attn_norm(x_BTD))
        if self.lancet_chunks == 1:
            return self._post_attention(x_BTD, o_BTHK, train, rng)
        # Lancet: chunk j's all-to-alls depend only on chunk j's projection,
        # norm and router, so they can run while chunk j+1's compute does.
        outs, auxes = [], []
        for j, (a, b) in enumerate(chunk_bounds(x_BTD.shape[1], self.lancet_chunks)):
            with jax.named_scope(f"lancet{j}"):
                out, aux = self._post_attention(x_BTD[:, a:b], o_BTHK[:, a:b], train, rng)
            outs.append(out)
            auxes.append(aux)
        return jnp.concatenate(outs, axis=1), combine_aux(auxes, self.ffn.cfg,
                                                          weights=[o.shape[1] for o in outs])

    def _post_attention(self, x_BTD, o_BTHK, train, rng):
        h_BTD = x_BTD + self.attn.project(o_BTHK)
        y_BTD, aux = self.ffn(self.ffn_norm(h_BTD), train=train, rng=rng)
        return h_BTD + y_BTD, aux

    def _scmoe(self, x_BTD, train, rng):
        # The experts start from the block input, so their all-to-all does not
        # wait for this block's attention.
        n_BTD = self.attn_norm(x_BTD)
        y_moe_BTD, aux = self.ffn(n_BTD, train=train, rng=rng)
        h_BTD = x_BTD + self.attn(n_BTD)
        return h_BTD + self.shortcut_mlp(self.ffn_norm(h_BTD)) + y_moe_BTD, aux


class GPT(nnx.Module):
    """tokens_BT -> (logits_BTV float32, MoEAux stacked over MoE layers or None)."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        self.embed_VD = nnx.Param(_init(1.0)(rngs.params(), (cfg.vocab_size, cfg.d_model), pdt))
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        if not cfg.tie_embeddings:
            self.unembed_DV = nnx.Param(
                _init(cfg.d_model ** -0.5)(rngs.params(), (cfg.d_model, cfg.vocab_size), pdt))

    def __call__(self, tokens_BT: jax.Array, *, train: bool = False,
                 rng: Optional[jax.Array] = None):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        x_BTD = jnp.take(self.embed_VD[...], tokens_BT, axis=0).astype(dt)
        auxes = []
        for i, block in enumerate(self.blocks):
            layer_rng = None if rng is None else jax.random.fold_in(rng, i)
            if cfg.remat == "none":
                x_BTD, aux = block(x_BTD, train, layer_rng)
            else:
                x_BTD, aux = _remat_block(block, x_BTD, train, layer_rng, cfg.remat)
            if aux is not None:
                auxes.append(aux)
        logits_BTV = self._unembed(self.final_norm(x_BTD)).astype(jnp.float32)
        aux = jax.tree.map(lambda *a: jnp.stack(a), *auxes) if auxes else None
        return logits_BTV, aux

    def _unembed(self, x_BTD: jax.Array) -> jax.Array:
        """[B, T, D] -> logits [B, T, V] in the compute dtype."""
        cfg, dt = self.cfg, x_BTD.dtype
        scale = cfg.d_model ** -0.5  # tied: a unit-variance embedding gives unit-scale logits
        if cfg.fsdp_collective_matmul:
            # The ring takes the tied [V, D] table itself, not its transpose,
            # so the spec it finds is the one the trainer gave the table.
            spec, w = (("btd,vd->btv", self.embed_VD[...].astype(dt) * scale)
                       if cfg.tie_embeddings else
                       ("btd,dv->btv", self.unembed_DV[...].astype(dt)))
            if fsdp.ring_applies(spec, x_BTD, w):
                return fsdp.ring_einsum(spec, x_BTD, w)
        if cfg.tie_embeddings:
            return jnp.einsum("btd,dv->btv", x_BTD, self.embed_VD[...].T.astype(dt) * scale)
        return jnp.einsum("btd,dv->btv", x_BTD, self.unembed_DV[...].astype(dt))

    def moe_blocks(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if b.is_moe]


def init_model(cfg: GPTConfig, seed: int = 0) -> GPT:
    """`GPT(cfg)` with its initialisers compiled as one jitted function.

    Creating the module eagerly dispatches (and compiles) every initialiser
    op separately, which takes seconds even for a tiny model on CPU.
    """
    make = lambda: nnx.split(GPT(cfg, rngs=nnx.Rngs(params=seed)))
    graphdef, _ = jax.eval_shape(make)
    _, state = compile_init(jax.jit(make))()
    return nnx.merge(graphdef, state)


def compile_init(jitted_init) -> Any:
    """Compiles a jitted initialiser, cheaply on CPU.

    XLA:CPU spends ~0.4 s of LLVM time per random-normal call at the default
    optimisation level (over 10 s for a small model); an initialiser runs
    once, so it is compiled at level 0, which is 4x faster to build.
    """
    opts = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
    return jitted_init.lower().compile(compiler_options=opts)


def _remat_block(block: Block, x_BTD: jax.Array, train: bool, rng, remat: str):
    """Recomputes the block's activations in the backward pass.

    A plain `jax.checkpoint` of a pure function of the block's state: the
    block mutates nothing during the forward pass (router biases are updated
    by the trainer afterwards), so no state needs to flow back out.
    """
    graphdef, state = nnx.split(block)
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == "dots" else None

    def fn(state, x_BTD, rng):
        return nnx.merge(graphdef, state)(x_BTD, train, rng)

    return jax.checkpoint(fn, policy=policy)(state, x_BTD, rng)


# ---------------------------------------------------------- counting ----

def param_count_formula(cfg: GPTConfig) -> dict[str, int]:
    """Total and active parameter counts from the shapes alone.

    `active` counts the weights one token touches: the top-k routed experts,
    shared experts and the router in MoE layers; everything else in full.
    """
    d, v, h, j, k = cfg.d_model, cfg.vocab_size, cfg.num_heads, cfg.kv_heads, cfg.head_size
    mats = 3 if cfg.activation == "swiglu" else 2
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


def count_params(tree: Any) -> int:
    return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(tree))

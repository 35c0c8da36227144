"""Import (and export) HF checkpoints: `config.json` + safetensors <-> jmoe params.

    cfg, params = jmoe.hf.load("path/to/hf_dir", mesh=mesh)      # fp32 by default
    logits_BTV, _, _ = jmoe.hf.forward(params, ids_BT, cfg)
    jmoe.hf.save("out_dir", params, cfg)                         # save_pretrained layout

Every parameter is a `Leaf`: its place in the params tree, its shape, the HF
tensors it comes from (with their shapes) and the two conversions. The whole
table is checked against the checkpoint's headers before any tensor is read,
so a missing tensor, a wrong shape or a tensor nobody reads stops the import
with its key. Then each leaf streams straight from the memory-mapped file to
its sharding: `jax.make_array_from_callback` asks for one device's block at a
time, and an expert weight's block reads only that device's experts, so no
device (and no host buffer) ever holds a full sharded tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jmoe.hf import config as config_lib
from jmoe.hf.config import HFConfig, UnsupportedCheckpoint
from jmoe.hf.safetensors import Checkpoint, save_file
from jmoe.sharding.specs import EXPERT_SPECS, restrict

# Tensors that carry no weights (old checkpoints store RoPE's inverse frequencies).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass
class Leaf:
    """One jmoe parameter and the HF tensors it is made of.

    read(ckpt, index) -> the block `index` (a tuple of slices) of the jmoe array;
    write(array) -> {hf key: array} (the save_pretrained layout).
    """

    path: tuple
    shape: tuple
    sources: dict                         # hf key -> expected shape
    read: Callable
    write: Callable
    expert: bool = False                  # [E, ...]: sharded over `expert`


def _linear(path, key, out_in, shape):
    """HF Linear weight [out, in] -> jmoe [in, out] reshaped to `shape`."""
    o, i = out_in
    return Leaf(path, tuple(shape), {key: (o, i)},
                read=lambda ck, idx: ck[key].T.reshape(shape)[idx],
                write=lambda a: {key: np.ascontiguousarray(a.reshape(i, o).T)})


def _vector(path, key, shape):
    n = int(np.prod(shape))
    return Leaf(path, tuple(shape), {key: (n,)},
                read=lambda ck, idx: ck[key].reshape(shape)[idx],
                write=lambda a: {key: np.ascontiguousarray(a.reshape(n))})


def _copy(path, key, shape):
    return Leaf(path, tuple(shape), {key: tuple(shape)},
                read=lambda ck, idx: ck[key][idx], write=lambda a: {key: np.asarray(a)})


def _experts(path, keys, out_in):
    """Per-expert HF Linears [out, in] -> jmoe [E, in, out]."""
    o, i = out_in
    e = len(keys)

    def read(ck, idx):
        rows = [ck[keys[x]][idx[2], idx[1]].T for x in range(e)[idx[0]]]
        return np.stack(rows) if rows else np.zeros((0, i, o))
    return Leaf(path, (e, i, o), {k: (o, i) for k in keys}, read,
                write=lambda a: {k: np.ascontiguousarray(a[x].T) for x, k in enumerate(keys)},
                expert=True)


def _fused(path, key, full_shape, rows: slice, e, i, o):
    """Fused HF experts [E, out_total, in], rows `rows` of out -> jmoe [E, in, o].

    Read-only: jmoe exports the per-expert layout transformers saves."""
    def read(ck, idx):
        return np.swapaxes(ck[key][idx[0], rows][:, idx[2], idx[1]], 1, 2)
    return Leaf(path, (e, i, o), {key: full_shape}, read, write=None, expert=True)


@dataclasses.dataclass
class _Columns:
    """Part of an HF tensor on export: every other last-axis column from `which`."""

    which: int
    value: np.ndarray


def _interleaved(path, key, e, d, f, which: int):
    """GPT-OSS gate_up_proj [E, D, 2F], column 2j gate / 2j+1 up -> jmoe [E, D, F]."""
    def read(ck, idx):
        cols = np.arange(f)[idx[2]] * 2 + which
        return ck[key][idx[0], idx[1]][:, :, cols]
    return Leaf(path, (e, d, f), {key: (e, d, 2 * f)}, read,
                write=lambda a: {key: _Columns(which, a)}, expert=True)


def _interleaved_bias(path, key, e, f, which: int):
    def read(ck, idx):
        return ck[key][idx[0]][:, np.arange(f)[idx[1]] * 2 + which]
    return Leaf(path, (e, f), {key: (e, 2 * f)}, read, write=lambda a: {key: _Columns(which, a)})


def _moe_leaves(cfg: HFConfig, ck_keys, lp: str, path: tuple) -> list:
    d, f, e = cfg.d_model, cfg.moe_d_ff, cfg.num_experts
    mixtral = cfg.model_type == "mixtral"
    pre = lp + ("block_sparse_moe" if mixtral else "mlp")
    if cfg.model_type == "gpt_oss":
        gu, gub, ex = f"{pre}.experts.gate_up_proj", f"{pre}.experts.gate_up_proj_bias", \
            path + ("experts",)
        down = _copy(ex + ("w_down_EFD",), f"{pre}.experts.down_proj", (e, f, d))
        down.expert = True
        return [_linear(path + ("router", "w_DE"), f"{pre}.router.weight", (e, d), (d, e)),
                _vector(path + ("router", "b_E"), f"{pre}.router.bias", (e,)),
                _interleaved(ex + ("w_gate_EDF",), gu, e, d, f, 0),
                _interleaved(ex + ("w_up_EDF",), gu, e, d, f, 1),
                _interleaved_bias(ex + ("b_gate_EF",), gub, e, f, 0),
                _interleaved_bias(ex + ("b_up_EF",), gub, e, f, 1), down,
                _copy(ex + ("b_down_ED",), f"{pre}.experts.down_proj_bias", (e, d))]
    out = [_linear(path + ("router", "w_DE"), f"{pre}.gate.weight", (e, d), (d, e))]
    if cfg.model_type == "deepseek_v3":
        # The selection bias is state, not a weight: it sits beside the layer's params.
        out.append(_vector(path[:-1] + ("moe_bias", "bias_E"),
                           f"{pre}.gate.e_score_correction_bias", (e,)))
    fused = f"{pre}.experts.gate_up_proj"
    ex = path + ("experts",)
    if fused in ck_keys:
        out += [_fused(ex + ("w_gate_EDF",), fused, (e, 2 * f, d), slice(0, f), e, d, f),
                _fused(ex + ("w_up_EDF",), fused, (e, 2 * f, d), slice(f, 2 * f), e, d, f),
                _fused(ex + ("w_down_EFD",), f"{pre}.experts.down_proj", (e, d, f),
                       slice(None), e, f, d)]
    else:
        names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        keys = lambda n: [f"{pre}.experts.{x}.{n}.weight" for x in range(e)]
        out += [_experts(ex + ("w_gate_EDF",), keys(names[0]), (f, d)),
                _experts(ex + ("w_up_EDF",), keys(names[1]), (f, d)),
                _experts(ex + ("w_down_EFD",), keys(names[2]), (d, f))]
    if cfg.shared_d_ff:
        fs, sh = cfg.shared_d_ff, path + ("shared",)
        sp = f"{pre}.shared_experts" if cfg.model_type == "deepseek_v3" else f"{pre}.shared_expert"
        out += [_linear(sh + ("w_gate_DF",), f"{sp}.gate_proj.weight", (fs, d), (d, fs)),
                _linear(sh + ("w_up_DF",), f"{sp}.up_proj.weight", (fs, d), (d, fs)),
                _linear(sh + ("w_down_FD",), f"{sp}.down_proj.weight", (d, fs), (fs, d))]
        if cfg.shared_gate:
            out.append(_linear(sh + ("w_gate_D1",), f"{pre}.shared_expert_gate.weight",
                               (1, d), (d, 1)))
    return out


def _mla_leaves(cfg: HFConfig, at: tuple, sa: str) -> list:
    """DeepSeek's multi-head latent attention. Names: C = kv_lora_rank (+ rope
    dims in w_kva_DC), L = q_lora_rank, N = qk_nope + qk_rope per head, U = v_head_dim."""
    d, h = cfg.d_model, cfg.num_heads
    ql, kl, nope, rot, vd = cfg.mla
    out = []
    if ql:
        out += [_linear(at + ("w_qa_DL",), sa + "q_a_proj.weight", (ql, d), (d, ql)),
                _vector(at + ("q_a_norm_L",), sa + "q_a_layernorm.weight", (ql,)),
                _linear(at + ("w_qb_LHN",), sa + "q_b_proj.weight", (h * (nope + rot), ql),
                        (ql, h, nope + rot))]
    else:
        out.append(_linear(at + ("w_q_DHN",), sa + "q_proj.weight", (h * (nope + rot), d),
                           (d, h, nope + rot)))
    out += [_linear(at + ("w_kva_DC",), sa + "kv_a_proj_with_mqa.weight", (kl + rot, d),
                    (d, kl + rot)),
            _vector(at + ("kv_a_norm_C",), sa + "kv_a_layernorm.weight", (kl,)),
            _linear(at + ("w_kvb_CHN",), sa + "kv_b_proj.weight", (h * (nope + vd), kl),
                    (kl, h, nope + vd)),
            _linear(at + ("w_o_HUD",), sa + "o_proj.weight", (d, h * vd), (h, vd, d))]
    return out


def leaves(cfg: HFConfig, ck_keys=()) -> list[Leaf]:
    """The full table of parameters for `cfg` (`ck_keys`: the checkpoint's names,
    to tell a fused expert layout from a per-expert one)."""
    d, v, h, j, q = cfg.d_model, cfg.vocab_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    out = [_copy(("embed", "w_VD"), "model.embed_tokens.weight", (v, d)),
           _vector(("final_norm", "scale_D"), "model.norm.weight", (d,))]
    if not cfg.tie_embeddings:
        out.append(_linear(("lm_head", "w_DV"), "lm_head.weight", (v, d), (d, v)))
    for i in range(cfg.num_layers):
        lp, path = f"model.layers.{i}.", ("layers", i)
        at, sa = path + ("attn",), lp + "self_attn."
        out += [_vector(path + ("attn_norm", "scale_D"), lp + "input_layernorm.weight", (d,)),
                _vector(path + ("mlp_norm", "scale_D"), lp + "post_attention_layernorm.weight",
                        (d,))]
        if cfg.mla:
            out += _mla_leaves(cfg, at, sa)
        else:
            out += [
                _linear(at + ("w_q_DHQ",), sa + "q_proj.weight", (h * q, d), (d, h, q)),
                _linear(at + ("w_k_DJQ",), sa + "k_proj.weight", (j * q, d), (d, j, q)),
                _linear(at + ("w_v_DJQ",), sa + "v_proj.weight", (j * q, d), (d, j, q)),
                _linear(at + ("w_o_HQD",), sa + "o_proj.weight", (d, h * q), (h, q, d))]
        if cfg.qkv_bias:
            out += [_vector(at + ("b_q_HQ",), sa + "q_proj.bias", (h, q)),
                    _vector(at + ("b_k_JQ",), sa + "k_proj.bias", (j, q)),
                    _vector(at + ("b_v_JQ",), sa + "v_proj.bias", (j, q))]
        if cfg.o_bias:
            out.append(_vector(at + ("b_o_D",), sa + "o_proj.bias", (d,)))
        if cfg.attn_sinks:
            out.append(_vector(at + ("sinks_H",), sa + "sinks", (h,)))
        if cfg.qk_norm:
            out += [_vector(at + ("q_norm_Q",), sa + "q_norm.weight", (q,)),
                    _vector(at + ("k_norm_Q",), sa + "k_norm.weight", (q,))]
        if cfg.moe_layers[i]:
            out += _moe_leaves(cfg, ck_keys, lp, path + ("moe",))
        else:
            fd, mp, mm = cfg.d_ff, lp + "mlp.", path + ("mlp",)
            out += [_linear(mm + ("w_gate_DF",), mp + "gate_proj.weight", (fd, d), (d, fd)),
                    _linear(mm + ("w_up_DF",), mp + "up_proj.weight", (fd, d), (d, fd)),
                    _linear(mm + ("w_down_FD",), mp + "down_proj.weight", (d, fd), (fd, d))]
    return out


def check(table: list[Leaf], ck: Checkpoint, model_type: str,
          allowed_extra: tuple = ()) -> None:
    """Every tensor the table needs is there with its shape; nothing is left unread."""
    used = set()
    for leaf in table:
        for key, shape in leaf.sources.items():
            if key not in ck:
                raise UnsupportedCheckpoint(
                    f"{ck.path}: tensor {key!r} is missing (a {model_type} checkpoint with "
                    f"this config.json has it, shape {list(shape)}).")
            if ck.shape(key) != tuple(shape):
                raise UnsupportedCheckpoint(
                    f"{ck.path}: tensor {key!r} has shape {list(ck.shape(key))} but config.json "
                    f"implies {list(shape)}: the checkpoint and its config.json disagree.")
            used.add(key)
    extra = sorted(k for k in ck if k not in used and not k.endswith(IGNORED_SUFFIXES)
                   and k not in allowed_extra)
    if extra:
        raise UnsupportedCheckpoint(
            f"{ck.path}: tensor {extra[0]!r} (and {len(extra) - 1} more) is not read by the "
            f"{model_type} importer: it belongs to an option jmoe.hf does not implement.")


def _set(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _listify(tree):
    """{"layers": {0: ..., 1: ...}} -> {"layers": [..., ...]}."""
    if isinstance(tree, dict):
        if tree and all(isinstance(k, int) for k in tree):
            return [_listify(tree[i]) for i in range(len(tree))]
        return {k: _listify(v) for k, v in tree.items()}
    return tree


def sharding_of(leaf: Leaf, mesh) -> Optional[NamedSharding]:
    """Expert weights over `expert` (jmoe's EXPERT_SPECS), everything else replicated."""
    if mesh is None:
        return None
    if leaf.expert:
        return NamedSharding(mesh, restrict(EXPERT_SPECS[leaf.path[-1]], mesh.axis_names))
    return NamedSharding(mesh, P())


def load(path: str, *, mesh=None, param_dtype: str = "float32", dtype: Optional[str] = None,
         **overrides) -> tuple[HFConfig, dict]:
    """(HFConfig, params) from an HF directory; params in `param_dtype`, placed on `mesh`.

    overrides: HFConfig fields (e.g. group_align). Raises `UnsupportedCheckpoint`
    (a ValueError) naming the key for anything it cannot import, before reading
    a tensor.
    """
    cfg, _ = config_lib.load_config(path, param_dtype=param_dtype,
                                    dtype=dtype or param_dtype, **overrides)
    ck = Checkpoint(path)
    table = leaves(cfg, set(ck))
    # A tied checkpoint may still store lm_head (a copy of the embedding);
    # DeepSeek-V3 stores its multi-token-prediction layers after the decoder's
    # (model.layers.{L}...), which generation does not use (transformers skips them too).
    allowed = ["lm_head.weight"] if cfg.tie_embeddings else []
    if cfg.model_type == "deepseek_v3":
        allowed += [k for k in ck if k.startswith("model.layers.")
                    and int(k.split(".")[2]) >= cfg.num_layers]
    check(table, ck, cfg.model_type, tuple(allowed))
    return cfg, place(table, ck, mesh, param_dtype)


def place(table: list[Leaf], ck: Checkpoint, mesh, param_dtype: str) -> dict:
    """Streams each leaf of a checked `table` onto its sharding (one device's block at a time)."""
    np_dtype = jnp.dtype(param_dtype)
    tree: dict = {}
    for leaf in table:
        sharding = sharding_of(leaf, mesh)
        if sharding is None:
            full = (slice(None),) * len(leaf.shape)
            arr = jnp.asarray(np.asarray(leaf.read(ck, full), dtype=np_dtype))
        else:
            arr = jax.make_array_from_callback(
                leaf.shape, sharding,
                lambda idx, leaf=leaf: np.asarray(leaf.read(ck, _full_index(idx, leaf.shape)),
                                                  dtype=np_dtype))
        _set(tree, leaf.path, arr)
    return _listify(tree)


def _full_index(idx, shape) -> tuple:
    """make_array_from_callback's index, with every dimension's slice spelled out."""
    idx = tuple(idx) + (slice(None),) * (len(shape) - len(idx))
    return tuple(slice(*s.indices(n)) for s, n in zip(idx, shape))


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def save(out: str, params: dict, cfg: HFConfig, *, source: Optional[str] = None,
         max_shard_bytes: int = 5 * 2 ** 30) -> None:
    """Writes `params` as an HF directory (save_pretrained's layout, per-expert
    tensors): model.safetensors (or shards + index) and config.json.

    source: the directory the model was imported from; its config.json,
    generation_config.json and tokenizer files are copied (config.json's
    dtype set to the params'), so transformers and jmoe load the result.
    """
    raw = {}
    if source is not None:
        with open(os.path.join(source, "config.json")) as f:
            raw = json.load(f)
    raw = to_dict(cfg, raw)  # raises before anything is written
    os.makedirs(out, exist_ok=True)
    tensors = {}
    for leaf in leaves(cfg):
        arr = np.asarray(jax.device_get(_get(params, leaf.path)))
        for key, value in leaf.write(arr).items():
            if isinstance(value, _Columns):  # GPT-OSS: gate and up interleave into one
                shape = value.value.shape[:-1] + (2 * value.value.shape[-1],)
                tensors.setdefault(key, np.zeros(shape, value.value.dtype))
                tensors[key][..., value.which::2] = value.value
            else:
                tensors[key] = value
    _write_shards(out, tensors, max_shard_bytes)
    if source is not None:
        for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json"):
            if os.path.exists(os.path.join(source, name)):
                shutil.copy(os.path.join(source, name), os.path.join(out, name))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(raw, f, indent=2, sort_keys=True)


def _write_shards(out: str, tensors: dict, max_bytes: int) -> None:
    shards, cur, size = [], {}, 0
    for name in sorted(tensors):
        nb = tensors[name].nbytes
        if cur and size + nb > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = tensors[name]
        size += nb
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out, "model.safetensors"))
        return
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out, fname))
        weight_map.update({k: fname for k in shard})
    total = sum(a.nbytes for a in tensors.values())
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def to_dict(cfg: HFConfig, base: Optional[dict] = None) -> dict:
    """The config.json fields `cfg` determines (on top of `base`, the source's)."""
    arch = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
            "qwen3_moe": "Qwen3MoeForCausalLM"}.get(cfg.model_type)
    raw = dict(base or {})
    if arch is None:
        if not base:
            raise UnsupportedCheckpoint(
                f"jmoe.hf.save: a {cfg.model_type} config.json is written from the source's: "
                "pass source= (the directory it was imported from).")
        raw["dtype"] = cfg.param_dtype
        return raw
    raw.update(model_type=cfg.model_type, architectures=[arch], vocab_size=cfg.vocab_size,
               hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
               num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
               head_dim=cfg.head_dim, num_experts_per_tok=cfg.top_k,
               rms_norm_eps=cfg.rms_eps, tie_word_embeddings=cfg.tie_embeddings,
               dtype=cfg.param_dtype, hidden_act="silu")
    raw.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": cfg.rope_theta})
    if cfg.model_type == "mixtral":
        raw.update(num_local_experts=cfg.num_experts, intermediate_size=cfg.moe_d_ff)
    else:
        raw.update(num_experts=cfg.num_experts, moe_intermediate_size=cfg.moe_d_ff,
                   intermediate_size=cfg.d_ff, norm_topk_prob=cfg.norm_topk_prob,
                   decoder_sparse_step=1,
                   mlp_only_layers=[i for i, m in enumerate(cfg.moe_layers) if not m])
        if cfg.model_type == "qwen2_moe":
            raw.update(shared_expert_intermediate_size=cfg.shared_d_ff, qkv_bias=cfg.qkv_bias)
        else:
            raw.update(attention_bias=cfg.qkv_bias)
    return raw

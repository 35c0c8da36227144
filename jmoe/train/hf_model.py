"""The trainer's second model family: an imported Hugging Face checkpoint.

`python train.py --config configs/hf_finetune.py --config.hf.path=DIR
--config.data.path=TEXT` fine-tunes a Mixtral / Qwen2-MoE / Qwen3-MoE /
GPT-OSS / DeepSeek-V3 checkpoint with the same loop, step, checkpoints and
metrics as the GPT-MoE (jmoe.train.loop). What differs lives here:

  * the model: `HFModel`, a `jmoe.train.step.ModelFamily` whose `apply` is
    `jmoe.hf.forward` on the params pytree (the GPT is an NNX graph);
  * the start: the checkpoint's tensors stream onto the state's shardings
    (`import_state`), only when the workdir has no checkpoint yet: a resumed
    run restores its trained weights and never re-reads the tensors;
  * the data: text through the checkpoint's tokenizer.json (`load_corpus`);
  * the end: `export` writes the trained weights back as an HF directory.

Training state: `params` is the HF params tree less DeepSeek-V3's selection
biases, which are state, not weights (`buffers`, nudged toward balance when
`config.hf.bias_update_rate` > 0, like the GPT's sigmoid router).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

import jmoe.hf as hf
from jmoe import routing
from jmoe.config import FieldError
from jmoe.hf import convert, tokenizer as tokenizer_lib
from jmoe.hf.config import HFConfig
from jmoe.hf.model import forward
from jmoe.hf.safetensors import Checkpoint
from jmoe.sharding.checks import check_layer_on_mesh
from jmoe.train import data, step as step_lib

EXPORT_DIR = "hf"  # under the workdir, unless config.hf.export_dir says otherwise


def is_hf(config: ml_collections.ConfigDict) -> bool:
    """Whether `config` trains an imported HF checkpoint (it has a `hf` section)."""
    return "hf" in config


def _fail(field: str, value: Any, fix: str) -> None:
    raise ValueError(f"config.{field}={value!r} is invalid: {fix}")


class HFModel(step_lib.ModelFamily):
    """An HF decoder as the trainer's model (the `graphdef` the steps bind in)."""

    def __init__(self, cfg: HFConfig, path: str, bias_update_rate: float = 0.0):
        self.cfg, self.path, self.bias_update_rate = cfg, path, float(bias_update_rate)
        self.moe_layers = [i for i, m in enumerate(cfg.moe_layers) if m]

    # --- the step's seam (jmoe.train.step.ModelFamily) ---

    def apply(self, params, buffers, inputs_BT, *, train, rng, placement):
        """(float32 logits [B, T, V], MoEAux with a leading [L_moe] axis)."""
        del train, rng  # the HF families have no dropout or router jitter
        if placement is not None:
            raise ValueError("HF models run without online expert re-placement.")
        logits_BTV, _, auxes = forward(merge(params, buffers), inputs_BT, self.cfg)
        aux = jax.tree.map(lambda *xs: jnp.stack(xs), *auxes) if auxes else None
        return logits_BTV, aux

    def update_router_biases(self, params, buffers, aux, rate: float):
        """DeepSeek-V3's aux-loss-free balancing: one `routing.update_bias` per MoE layer."""
        del params
        out = dict(buffers)
        for row, layer in enumerate(self.moe_layers):
            key = _bias_key(layer)
            if key in out:
                out[key] = {"bias_E": routing.update_bias(out[key]["bias_E"],
                                                          aux.expert_load[row], rate)}
        return out

    # --- what the loop needs besides the step ---

    def step_config(self, config) -> step_lib.StepConfig:
        return step_lib.StepConfig(
            seed=int(config.seed), grad_accum_steps=int(config.grad_accum_steps),
            load_balance_weight=float(config.loss.load_balance_weight),
            z_loss_weight=float(config.loss.z_loss_weight),
            update_router_bias=self.cfg.router == "sigmoid_topk" and self.bias_update_rate > 0,
            bias_update_rate=self.bias_update_rate)

    def abstract_params(self) -> dict:
        """The params tree as ShapeDtypeStructs, from the checkpoint's headers
        (checked against config.json: a missing or misshapen tensor stops here)."""
        ck = Checkpoint(self.path)
        table = convert.leaves(self.cfg, set(ck))
        tree: dict = {}
        for leaf in table:
            node = tree
            for p in leaf.path[:-1]:
                node = node.setdefault(p, {})
            node[leaf.path[-1]] = jax.ShapeDtypeStruct(leaf.shape, jnp.dtype(self.cfg.param_dtype))
        tree["layers"] = [tree["layers"][i] for i in range(self.cfg.num_layers)]
        return tree

    def abstract_state(self, tx: optax.GradientTransformation) -> step_lib.TrainState:
        return jax.eval_shape(lambda p: _state(*split(p), tx), self.abstract_params())

    def import_state(self, tx: optax.GradientTransformation, shardings) -> step_lib.TrainState:
        """Step 0's state: the checkpoint's tensors on the state's shardings, fresh Adam moments."""
        _, params = hf.load(self.path, mesh=shardings.step.mesh,
                            param_dtype=self.cfg.param_dtype, dtype=self.cfg.dtype,
                            group_align=self.cfg.group_align)
        trainable, buffers = split(params)
        # The importer places expert weights over `expert` and replicates the
        # rest; the state's table may differ (FSDP).
        trainable = jax.device_put(trainable, shardings.params)
        buffers = jax.device_put(buffers, shardings.buffers)
        return jax.jit(lambda p, b: _state(p, b, tx), out_shardings=shardings)(trainable, buffers)

    def param_counts(self) -> dict:
        """{"total", "active"}: active counts top_k of the routed experts."""
        total = expert = 0
        for path, leaf in jax.tree_util.tree_flatten_with_path(self.abstract_params())[0]:
            n = math.prod(leaf.shape)
            total += n
            if "experts" in jax.tree_util.keystr(path):
                expert += n
        active = total - expert + expert * self.cfg.top_k // self.cfg.num_experts
        return {"total": total, "active": active}

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x active weights (less the embedding
        lookup) + causal attention's scores and values, forward and backward."""
        c = self.cfg
        weights = self.param_counts()["active"] - c.vocab_size * c.d_model * (
            1 if not c.tie_embeddings else 0)
        attn = 6 * c.num_layers * c.num_heads * c.head_dim * seq_len  # 12 * L*H*Q*T / 2 (causal)
        return 6.0 * weights + attn

    def describe(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """The config a checkpoint stores: `config` plus `hf.architecture`, the
        model as read from config.json (a resumed run must match it)."""
        out = ml_collections.ConfigDict(config.to_dict())
        out.hf.architecture = _architecture(self.cfg)
        return out

    def check_same_model(self, saved: ml_collections.ConfigDict) -> None:
        """ValueError when the workdir's checkpoint holds another model."""
        saved_arch = saved.get("hf", {}).get("architecture")
        saved_arch = saved_arch.to_dict() if saved_arch is not None else None
        now = _architecture(self.cfg)
        if saved_arch is None:
            raise ValueError("the checkpoint in this workdir is not of an HF model run "
                             "(no config.hf): use a new --workdir.")
        for k in sorted(set(saved_arch) | set(now)):
            if _canonical(saved_arch.get(k)) != _canonical(now.get(k)):
                raise ValueError(
                    f"config.hf.path={self.path!r} gives {k}={now.get(k)!r} but the checkpoint "
                    f"in this workdir has {saved_arch.get(k)!r}: point config.hf.path at the "
                    "checkpoint this run started from (or its config.hf.param_dtype / dtype / "
                    "group_align), or use a new --workdir.")

    def export(self, out: str, state: step_lib.TrainState) -> str:
        """Writes the state's weights to `out` as an HF directory (config.json,
        tokenizer and generation config copied from config.hf.path). Every
        process gathers; process 0 writes into `out`.tmp, then renames."""
        params = jax.tree.map(_gather, merge(state.params, state.buffers))
        if jax.process_index() == 0:
            tmp = out.rstrip("/") + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            hf.save(tmp, params, self.cfg, source=self.path)
            # Never a half-written `out`: a kill leaves whole directories only
            # (`out`, or `out`.old and the complete `out`.tmp).
            old = out.rstrip("/") + ".old"
            shutil.rmtree(old, ignore_errors=True)
            if os.path.exists(out):
                os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jmoe_hf_export")
        return out


def _gather(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _canonical(v):
    if isinstance(v, (list, tuple)):
        return [_canonical(x) for x in v]
    return v


def _architecture(cfg: HFConfig) -> dict:
    return {k: _canonical(v) for k, v in dataclasses.asdict(cfg).items()}


def _state(params, buffers, tx) -> step_lib.TrainState:
    return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params), buffers=buffers)


def _bias_key(layer: int) -> str:
    return f"layer_{layer:03d}"


def split(params: dict) -> tuple[dict, dict]:
    """HF params -> (trainable params, buffers {"layer_NNN": {"bias_E"}}):
    DeepSeek-V3's selection biases leave the optimizer's tree."""
    layers, buffers = [], {}
    for i, lp in enumerate(params["layers"]):
        if "moe_bias" in lp:
            buffers[_bias_key(i)] = lp["moe_bias"]
            lp = {k: v for k, v in lp.items() if k != "moe_bias"}
        layers.append(lp)
    return dict(params, layers=layers), buffers


def merge(params: dict, buffers: dict) -> dict:
    """The inverse of `split`: the params tree jmoe.hf.forward and jmoe.hf.save take."""
    if not buffers:
        return params
    layers = [dict(lp, moe_bias=buffers[_bias_key(i)]) if _bias_key(i) in buffers else lp
              for i, lp in enumerate(params["layers"])]
    return dict(params, layers=layers)


def validate_config(config: ml_collections.ConfigDict) -> HFModel:
    """The checks that need no devices: refused trainer features (naming the
    field), the checkpoint's config.json, the data source. Returns the model."""
    h = config.hf
    if not h.path or not os.path.isdir(h.path):
        _fail("hf.path", h.path, "must be an HF checkpoint directory (config.json, "
              "*.safetensors, tokenizer.json): --config.hf.path=DIR.")
    pl = config.get("placement")
    if pl is not None and pl.get("every", 0):
        _fail("placement.every", pl.every,
              "online expert re-placement is for the GPT-MoE only (it keeps experts in slot "
              "order inside jmoe.model); HF models keep their static layout: set it to 0.")
    if pl is not None and pl.get("spare_slots", 0):
        _fail("placement.spare_slots", pl.spare_slots,
              "spare slots belong to online re-placement, which HF models do not run: set 0.")
    ad = config.get("adaptive")
    if ad is not None and ad.get("plans", 0) > 1:
        _fail("adaptive.plans", ad.plans,
              "adaptive plans switch the GPT-MoE's execution plans; HF models run one plan: "
              "set 0.")
    if config.mesh.get("tensor", 1) not in (1,):
        _fail("mesh.tensor", config.mesh.tensor,
              "HF models run expert parallelism and FSDP, not expert tensor parallelism: "
              "set 1 (use config.mesh.expert and config.mesh.fsdp).")
    if config.data.source not in ("text", "tokens", "stdlib"):
        _fail("data.source", config.data.source, "choose 'text' (a file or folder, through "
              "the checkpoint's tokenizer.json), 'stdlib' (the same, on Python's standard "
              "library) or 'tokens' (ids already made with that tokenizer).")
    if not float(h.bias_update_rate) >= 0:
        _fail("hf.bias_update_rate", h.bias_update_rate, "must be >= 0 (0: the imported "
              "selection biases stay as they are).")
    if not isinstance(h.export_every, int) or h.export_every < 0:
        _fail("hf.export_every", h.export_every, "must be an integer >= 0 (0: export only "
              "when the run ends).")
    cfg, _ = hf.load_config(h.path, param_dtype=h.param_dtype, dtype=h.dtype or h.param_dtype,
                            group_align=int(h.group_align))
    if h.bias_update_rate and cfg.router != "sigmoid_topk":
        _fail("hf.bias_update_rate", h.bias_update_rate,
              f"a {cfg.model_type} checkpoint has no selection bias (DeepSeek-V3 has): set 0.")
    return HFModel(cfg, h.path, h.bias_update_rate)


def validate_mesh(config, model: HFModel, mesh) -> None:
    try:
        check_layer_on_mesh(model.cfg.moe_config(), mesh)
    except FieldError as e:
        raise ValueError(f"config.mesh: {model.cfg.model_type} checkpoint {model.path}: {e}") \
            from None


def load_corpus(data_cfg, model: HFModel) -> data.Corpus:
    """The run's token streams: text (a file split by position, a folder or the
    stdlib split by file, like the GPT's byte data) through the checkpoint's
    tokenizer.json, an EOS after each file; or a pre-tokenised file."""
    vocab = model.cfg.vocab_size
    if data_cfg.source == "tokens":
        return data.load_corpus(data_cfg, vocab)
    tok = tokenizer_lib.load(model.path)

    def encode(file: str) -> list[int]:
        with open(file, encoding="utf-8", errors="replace") as f:
            ids = tok.encode(f.read())
        return ids + ([tok.eos_id] if tok.eos_id is not None else [])

    path, pct = data_cfg.path, float(data_cfg.val_percent)
    if data_cfg.source == "stdlib":
        path = data.stdlib_root()
        files = data._list_files(path, "*.py", ("site-packages", "dist-packages", "__pycache__"))
    elif not path or not os.path.exists(path):
        raise ValueError(f"config.data.path={path!r} does not exist: point it at a text "
                         "file or a folder of text files.")
    elif os.path.isdir(path):
        files = data._list_files(path, data_cfg.glob, ("__pycache__",))
        if not files:
            raise ValueError(f"config.data.path={path!r} has no files matching "
                             f"config.data.glob={data_cfg.glob!r}.")
    else:
        ids = np.asarray(encode(path), np.int32)
        n_val = int(len(ids) * pct / 100)
        return _corpus(ids[:len(ids) - n_val], ids[len(ids) - n_val:], vocab,
                       f"text file {path} ({model.cfg.model_type} tokenizer)")
    parts: dict[bool, list[int]] = {False: [], True: []}
    for rel in files:  # sorted: the same stream on every host
        parts[data._is_val_file(rel, pct)] += encode(os.path.join(path, rel))
    return _corpus(np.asarray(parts[False], np.int32), np.asarray(parts[True], np.int32), vocab,
                   f"{data_cfg.source} {path} ({len(files)} files, {model.cfg.model_type} "
                   "tokenizer)")


def _corpus(train: np.ndarray, val: np.ndarray, vocab: int, desc: str) -> data.Corpus:
    top = int(max(train.max(initial=0), val.max(initial=0)))
    if top >= vocab:
        raise ValueError(f"the tokenizer gives id {top}, beyond the checkpoint's vocab_size "
                         f"{vocab}: config.hf.path's tokenizer.json does not fit its model.")
    return data.Corpus(train=train, val=val, vocab_size=vocab, description=desc)


def export_dir(config, workdir: str) -> str:
    return config.hf.export_dir or os.path.join(workdir, EXPORT_DIR)

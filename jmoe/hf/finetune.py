"""Fine-tuning an imported checkpoint: the loss, a jitted optimizer step, text batches.

    cfg, params = jmoe.hf.load("hf_dir", mesh=mesh)
    tok = jmoe.hf.tokenizer.load("hf_dir")
    ids = tokenize_path("corpus/", tok)          # a text file or a folder of them
    tx = optax.adamw(1e-5)
    step = make_train_step(cfg, tx, aux_weights={"load_balance_loss": 1e-2})
    opt_state = tx.init(params)
    with jax.set_mesh(mesh):
        for batch_BT1 in text_batches(ids, batch=8, seq_len=256):
            params, opt_state, metrics = step(params, opt_state, batch_BT1)

Under a mesh with an `expert` axis the MoE layers run expert-parallel, as in
the forward pass (tokens split over `data` x `expert`, expert weights and
their Adam moments over `expert`). `jmoe.hf.save` writes the result back.
This is the building block; `python train.py --config configs/hf_finetune.py`
trains an imported checkpoint with the full trainer (jmoe.train.hf_model:
resume, FSDP, metrics, export; see docs/huggingface.md).
"""

from __future__ import annotations

import functools
import os
from typing import Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jmoe.hf.config import HFConfig
from jmoe.hf.model import forward
from jmoe.losses import aux_loss


def loss_fn(params, tokens_BT1: jax.Array, cfg: HFConfig,
            aux_weights: Optional[Mapping[str, float]] = None):
    """Mean next-token cross-entropy of tokens_BT1[:, :-1] -> [:, 1:], plus the
    weighted MoE auxiliary losses (mean over MoE layers). Returns (loss, metrics)."""
    logits_BTV, _, auxes = forward(params, tokens_BT1[:, :-1], cfg)
    targets_BT = tokens_BT1[:, 1:]
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT))
    aux = jnp.zeros((), jnp.float32)
    if aux_weights and auxes:
        aux, _ = aux_loss(auxes, dict(aux_weights))
    return ce + aux, {"loss": ce + aux, "ce": ce, "aux": aux}


def make_train_step(cfg: HFConfig, tx: optax.GradientTransformation,
                    aux_weights: Optional[Mapping[str, float]] = None):
    """A jitted `(params, opt_state, tokens_BT1) -> (params, opt_state, metrics)`;
    params and optimizer state are donated."""

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, tokens_BT1):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, tokens_BT1, cfg, aux_weights)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    return step


def text_batches(ids: Sequence[int], *, batch: int, seq_len: int,
                 seed: int = 0) -> Iterator[np.ndarray]:
    """Endless int32 [batch, seq_len + 1] windows drawn at random from one
    token stream (a tokenised text file or folder, concatenated)."""
    ids = np.asarray(ids, np.int32)
    if ids.size < seq_len + 2:
        raise ValueError(f"the text has {ids.size} tokens, fewer than seq_len + 2 = "
                         f"{seq_len + 2}: lower seq_len or give more text.")
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, ids.size - seq_len - 1, batch)
        yield np.stack([ids[s:s + seq_len + 1] for s in starts])


TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".json", ".jsonl")


def tokenize_path(path: str, tokenizer, *, suffixes: Sequence[str] = TEXT_SUFFIXES) -> list[int]:
    """One token stream from a text file, or from every file under a folder
    whose name ends in `suffixes` (sorted, so the stream is the same on every
    host), each followed by the tokenizer's EOS id when it has one."""
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names
                       if f.endswith(tuple(suffixes)))
    elif os.path.exists(path):
        files = [path]
    else:
        raise FileNotFoundError(f"no text at {path}: give a text file or a folder of them.")
    if not files:
        raise ValueError(f"{path} holds no file ending in {tuple(suffixes)}: pass suffixes=.")
    ids: list[int] = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            ids += tokenizer.encode(fh.read())
        if tokenizer.eos_id is not None:
            ids.append(tokenizer.eos_id)
    return ids

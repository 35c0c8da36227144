"""Fine-tuning an imported checkpoint (jmoe.hf.finetune): gradients on an
expert-parallel mesh equal one device's, and training lowers the loss."""

from __future__ import annotations

import os

import jax
import numpy as np
import optax
import pytest

import jmoe.hf as hf
from jmoe.hf import finetune
from jmoe.sharding.mesh import make_mesh

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
AUX = {"load_balance_loss": 1e-2}


def _ce_reference(params, tokens, cfg):
    """Cross-entropy written out from the model's logits with NumPy."""
    logits, _, _ = hf.forward(params, tokens[:, :-1], cfg)
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                           keepdims=True)) - logits.max(-1, keepdims=True)
    return -np.mean(np.take_along_axis(logp, tokens[:, 1:, None], -1))


@pytest.mark.slow  # two gradient compiles, one expert-parallel (~25-50 s on 2 shared cores)
def test_expert_parallel_gradients_equal_one_device():
    path = os.path.join(FIX, "qwen2_moe")
    tokens = np.random.default_rng(0).integers(3, 96, (4, 17)).astype(np.int32)
    cfg, p1 = hf.load(path)
    (loss1, m1), g1 = jax.jit(jax.value_and_grad(
        lambda p, t: finetune.loss_fn(p, t, cfg, AUX), has_aux=True))(p1, tokens)
    np.testing.assert_allclose(float(m1["ce"]), _ce_reference(p1, tokens, cfg), rtol=1e-5)
    assert float(m1["aux"]) > 0  # the balance loss is in the objective
    mesh = make_mesh(data=2, expert=4)
    _, p8 = hf.load(path, mesh=mesh)
    with jax.set_mesh(mesh):
        (loss8, _), g8 = jax.jit(jax.value_and_grad(
            lambda p, t: finetune.loss_fn(p, t, cfg, AUX), has_aux=True))(p8, tokens)
    np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-5)
    flat1, flat8 = jax.tree.leaves(g1), jax.tree.leaves(g8)
    scale = max(float(np.max(np.abs(np.asarray(g)))) for g in flat1)
    for a, b in zip(flat1, flat8):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5 * scale)
    w = g8["layers"][0]["moe"]["experts"]["w_up_EDF"]
    assert {s.data.shape[0] for s in w.addressable_shards} == {cfg.num_experts // 4}


def test_training_on_text_lowers_the_loss(tmp_path):
    from jmoe.hf import tokenizer as tokenizer_lib
    path = os.path.join(FIX, "mixtral")
    cfg, params = hf.load(path)
    tok = tokenizer_lib.load(path)
    # A folder of text: a periodic stream split over two files (and a file skipped).
    words = [f"w{3 + (i * 7) % 40}" for i in range(400)]
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text(" ".join(words[:200]))
    (tmp_path / "b" / "c.txt").write_text(" ".join(words[200:]))
    (tmp_path / "b" / "skip.bin").write_text("w90 " * 50)
    ids = finetune.tokenize_path(str(tmp_path), tok)
    assert ids == tok.encode(" ".join(words[:200])) + [2] + tok.encode(" ".join(words[200:])) + [2]
    batches = finetune.text_batches(ids, batch=4, seq_len=16)
    tx = optax.adam(3e-3)
    step = finetune.make_train_step(cfg, tx, AUX)
    opt_state = tx.init(params)
    losses = []
    for _ in range(12):
        params, opt_state, m = step(params, opt_state, next(batches))
        losses.append(float(m["ce"]))
    assert losses[-1] < 0.5 * losses[0], losses

"""Decode speed: KV-cache generation (jmoe.hf.generate, jmoe.generate) against the no-cache sampler.

    python bench/generate.py --json bench/results/generate.json
    python bench/generate.py --new 64 --quick             # quicker
    python bench/generate.py --models gpt                 # only the GPT-MoE rows

Models (fp32, one CPU device):
  fixture     tests/fixtures/hf/mixtral (2 layers, d=32, 4 experts): a tiny Mixtral
  default     a Mixtral-family model of the default GPT's shape (configs/gpt_moe.py:
              4 layers, d=256, 4 heads, 16 experts of d_ff 256, top-2, vocab 256),
              random weights
  gpt         the default GPT-MoE itself (jmoe.model.GPT of configs/gpt_moe.py, random
              init) with jmoe.generate's KV cache, against the no-cache sampler
              `python -m jmoe.sample` used before it (`_gpt_nocache_next_token`: the
              model over the run's window of seq_len=256 per token, logits read at the
              last position), both sampling at temperature 0.8, top-k 40

For batch 1 and 8 and a 16-token prompt, `--new` new tokens (default 256):
  prefill (ms)      the prompt through the model, filling a cache of prompt + new slots
  cached tok/s      new tokens per second of decode (one compiled step per token)
  no-cache tok/s    the current sampler's method on the same model: each token runs
                    the model over a fixed window of prompt + new tokens (static
                    shape, one compile) and reads the logits at the last position.
                    Its cost per token does not depend on the position, so it is
                    timed over --nocache_steps tokens.
  speed-up          cached / no-cache tokens per second
Target (issue 16): >= 10x the no-cache sampler at 256 new tokens, batch 1.
Compile time is excluded (a warm-up call of each function first).
"""

from __future__ import annotations

import functools
import os
import sys
import time

import harness  # noqa: F401  (puts this checkout first)

harness.setup(host_devices=1)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jmoe.hf as hf  # noqa: E402
from jmoe.hf import convert as load_lib, generation  # noqa: E402

FIXTURE = os.path.join(harness.ROOT, "tests", "fixtures", "hf", "mixtral")


def default_shaped() -> tuple[hf.HFConfig, dict]:
    cfg = hf.HFConfig(model_type="mixtral", vocab_size=256, d_model=256, num_layers=4,
                      num_heads=4, num_kv_heads=4, head_dim=64, d_ff=256, moe_d_ff=256,
                      num_experts=16, top_k=2, norm_topk_prob=True, moe_layers=(True,) * 4,
                      max_positions=4096)
    params: dict = {}
    keys = iter(jax.random.split(jax.random.key(0), 4096))
    for leaf in load_lib.leaves(cfg):
        scale = 1.0 if leaf.path[-1] == "scale_D" else 0.05
        load_lib._set(params, leaf.path, scale * jax.random.normal(next(keys), leaf.shape)
                      if scale != 1.0 else jnp.ones(leaf.shape))
    return cfg, load_lib._listify(params)


def _block(x):
    return jax.block_until_ready(x)


def time_cached(params, cfg, prompts, new):
    ids, lengths = generation.pad_prompts(prompts)
    max_len = ids.shape[1] + new
    ids, lengths = jnp.asarray(ids), jnp.asarray(lengths)
    hf.generate(params, cfg, prompts, max_new_tokens=new)  # warm-up: compiles both steps
    t0 = time.perf_counter()
    logits, cache = _block(generation.prefill(params, ids, lengths, cfg, max_len))
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    toks = hf.generate(params, cfg, prompts, max_new_tokens=new)
    gen_s = time.perf_counter() - t0
    assert toks.shape == (len(prompts), new)
    # generate() includes one prefill; decode rate over the remaining new - 1 tokens.
    return prefill_s, len(prompts) * (new - 1) / max(gen_s - prefill_s, 1e-9)


def time_nocache(params, cfg, prompts, new, steps):
    b, p = len(prompts), len(prompts[0])
    window = p + new

    @jax.jit
    def next_token(params, buf_BW, pos):
        logits, _, _ = hf.forward(params, buf_BW, cfg)
        return jnp.argmax(logits[:, pos - 1], -1).astype(jnp.int32)

    buf = jnp.zeros((b, window), jnp.int32).at[:, :p].set(jnp.asarray(prompts))
    _block(next_token(params, buf, p))
    t0 = time.perf_counter()
    for i in range(steps):
        tok = next_token(params, buf, p + i)
        buf = buf.at[:, p + i].set(tok)
    _block(buf)
    return b * steps / (time.perf_counter() - t0)


def default_gpt():
    """(GPT of configs/gpt_moe.py with random weights, its window seq_len)."""
    from jmoe import model_config
    from jmoe.model import init_model
    sys.path.insert(0, os.path.join(harness.ROOT, "configs"))
    import gpt_moe
    config = gpt_moe.get_config()
    gpt_cfg = model_config.from_config(config.model, config.get("execution"))
    return init_model(gpt_cfg, seed=0), config.data.seq_len


@functools.partial(jax.jit, static_argnames=("graphdef", "top_k"))
def _gpt_nocache_next_token(graphdef, state, buf_BT, pos, key, temperature, top_k: int):
    """The sampler of `python -m jmoe.sample` before the KV cache (its
    `_next_token`, for B rows): the whole window through the model per token."""
    from flax import nnx
    logits_BTV, _ = nnx.merge(graphdef, state)(buf_BT)
    logits_BV = logits_BTV[:, pos - 1] / jnp.maximum(temperature, 1e-6)
    if top_k > 0:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV)


def time_gpt(model, seq, prompts, new, steps):
    """(prefill s, KV-cache decode tok/s, no-cache sampler tok/s) on the GPT-MoE."""
    from flax import nnx
    from jmoe import generate as gen
    kw = dict(max_new_tokens=new, temperature=0.8, top_k=40)
    graphdef, state = nnx.split(model)
    ids, lengths = generation.pad_prompts(prompts)
    ids, lengths = jnp.asarray(ids), jnp.asarray(lengths)
    gen.generate(model, prompts, **kw)  # warm-up: compiles both steps
    t0 = time.perf_counter()
    _block(gen.prefill(graphdef, state, ids, lengths, ids.shape[1] + new))
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    toks = gen.generate(model, prompts, **kw)
    gen_s = time.perf_counter() - t0
    assert toks.shape == (len(prompts), new)
    cached = len(prompts) * (new - 1) / max(gen_s - prefill_s, 1e-9)
    # No cache: a fixed window of seq_len, so each token costs the same.
    b, p = len(prompts), len(prompts[0])
    buf = jnp.zeros((b, seq), jnp.int32).at[:, :p].set(jnp.asarray(prompts))
    key = jax.random.key(0)
    _block(_gpt_nocache_next_token(graphdef, state, buf, p, key, 0.8, 40))
    t0 = time.perf_counter()
    for i in range(steps):
        tok = _gpt_nocache_next_token(graphdef, state, buf, p + i, jax.random.fold_in(key, i),
                                      0.8, 40)
        buf = buf.at[:, p + i].set(tok)
    _block(buf)
    return prefill_s, cached, b * steps / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = harness.parser(__doc__, quick=dict(new=64, nocache_steps=8))
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--nocache_steps", type=int, default=24)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--models", default="fixture,default,gpt")
    a = p.parse_args(argv)
    load_start = os.getloadavg()[0]
    which = a.models.split(",")
    rng = np.random.default_rng(0)
    rows = []
    # The fixture says max_position_embeddings=256; RoPE has no table, so the bench
    # lets it run past that (prompt 16 + 256 new).
    models = {"fixture": lambda: hf.load(FIXTURE, max_positions=1024), "default": default_shaped}
    for name, (cfg, params) in ((n, f()) for n, f in models.items() if n in which):
        for b in map(int, a.batches.split(",")):
            prompts = rng.integers(3, cfg.vocab_size, (b, 16)).tolist()
            prefill_s, cached = time_cached(params, cfg, prompts, a.new)
            nocache = time_nocache(params, cfg, prompts, a.new, a.nocache_steps)
            rows.append(dict(model=name, batch=b, new=a.new, prefill_ms=1e3 * prefill_s,
                             cached_tok_s=cached, nocache_tok_s=nocache,
                             speedup=cached / nocache))
            print(f"{name:8s} batch {b}: prefill {1e3 * prefill_s:7.1f} ms  cached "
                  f"{cached:8.1f} tok/s  no-cache {nocache:7.1f} tok/s  x{cached / nocache:.1f}",
                  flush=True)
    gpt, seq = default_gpt()
    for b in map(int, a.batches.split(",") if "gpt" in which else ()):
        prompts = rng.integers(3, gpt.cfg.vocab_size, (b, 16)).tolist()
        prefill_s, cached, nocache = time_gpt(gpt, seq, prompts, a.new, a.nocache_steps)
        rows.append(dict(model="gpt", batch=b, new=a.new, prefill_ms=1e3 * prefill_s,
                         cached_tok_s=cached, nocache_tok_s=nocache, speedup=cached / nocache))
        print(f"gpt      batch {b}: prefill {1e3 * prefill_s:7.1f} ms  cached {cached:8.1f} "
              f"tok/s  no-cache (window {seq}) {nocache:7.1f} tok/s  x{cached / nocache:.1f}",
              flush=True)
    harness.print_markdown(["model", "batch", "new", "prefill ms", "cached tok/s",
                            "no-cache tok/s", "speed-up"],
                           [[r["model"], r["batch"], r["new"], f"{r['prefill_ms']:.1f}",
                             f"{r['cached_tok_s']:.1f}", f"{r['nocache_tok_s']:.1f}",
                             f"{r['speedup']:.1f}x"] for r in rows])
    # The machine is shared: the 1-minute load average (2 cores) before and after.
    harness.write_json(a.json, {**harness.machine_info(), "rows": rows, "gpt_window": seq,
                                "load_avg_1min": [load_start, os.getloadavg()[0]]})
    return 0


if __name__ == "__main__":
    sys.exit(main())

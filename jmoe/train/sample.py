"""Generates text from the latest checkpoint of a run.

  python -m jmoe.train.sample runs/NAME --prompt "def main(" --length 400 \
      --temperature 0.8 --top_k 40 --seed 0

The model and vocabulary come from the config saved in the checkpoint. Byte
vocabularies (the stdlib and text sources) print text; token files print ids.
Each new token runs the model over a window of at most `seq_len` tokens (no
KV cache: simple, and fast enough for the small models this is meant for).

Given a Hugging Face directory instead (config.json + safetensors +
tokenizer.json; Mixtral, Qwen2-MoE, Qwen3-MoE), it imports it with `jmoe.hf`
and samples with a KV cache (prefill, then one token per step):

  python -m jmoe.sample path/to/hf_dir --prompt "Hello" --length 64 --top_p 0.9
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jmoe import hf, model as model_lib, model_config
from jmoe.train import checkpoint, step as step_lib


def load(workdir: str, step: Optional[int] = None):
    """(GPT with restored weights, config, step) from a run directory."""
    step, config = checkpoint.restore_config(workdir, step)
    gpt = model_config.from_config(config.model, config.get("execution"))
    tx = step_lib.make_optimizer(config.opt, config.total_steps)
    abstract = jax.eval_shape(step_lib.make_init(gpt, tx, config.seed))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          abstract)
    mgr = checkpoint.manager(workdir, every=1, keep=1, read_only=True)
    _, state, _ = checkpoint.restore(mgr, target, step)
    mgr.close()
    model = nnx.merge(step_lib.graphdef_of(gpt), state.params, state.buffers)
    return model, config, step


@functools.partial(jax.jit, static_argnames=("graphdef", "top_k"))
def _next_token(graphdef, state, buf_1T, pos, key, temperature, top_k: int):
    logits_1TV, _ = nnx.merge(graphdef, state)(buf_1T)
    logits_V = logits_1TV[0, pos - 1] / jnp.maximum(temperature, 1e-6)
    if top_k > 0:
        kth = jax.lax.top_k(logits_V, top_k)[0][-1]
        logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
    return jax.random.categorical(key, logits_V)


def generate(model: model_lib.GPT, prompt: np.ndarray, *, length: int, seq_len: int,
             temperature: float = 0.8, top_k: int = 40, seed: int = 0) -> np.ndarray:
    """`prompt` followed by `length` sampled token ids."""
    graphdef, state = nnx.split(model)
    out = [int(t) for t in prompt] or [ord("\n")]
    key = jax.random.key(seed)
    for i in range(length):
        window = out[-seq_len:]
        buf = np.zeros((1, seq_len), np.int32)
        buf[0, :len(window)] = window
        tok = _next_token(graphdef, state, jnp.asarray(buf), len(window),
                          jax.random.fold_in(key, i), temperature, top_k)
        out.append(int(tok))
    return np.array(out[len(prompt):] if len(prompt) else out[1:], np.int64)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jmoe.sample", description=__doc__.split("\n")[0])
    ap.add_argument("workdir")
    ap.add_argument("--prompt", default="def ", help="text (byte vocab) or comma-separated ids")
    ap.add_argument("--length", type=int, default=300)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top_k", type=int, default=40, help="0: sample from the full distribution")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--top_p", type=float, default=1.0,
                    help="nucleus sampling (Hugging Face directories; 1.0: off)")
    ap.add_argument("--no_bos", action="store_true",
                    help="do not put the checkpoint's BOS id before the prompt (HF)")
    args = ap.parse_args(argv)
    if os.path.exists(os.path.join(args.workdir, "config.json")):
        return sample_hf(args)
    from absl import logging

    logging.set_verbosity(logging.ERROR)  # Orbax notes that a read-only manager is read-only
    try:
        model, config, step = load(args.workdir, args.step)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    is_bytes = config.data.source in ("stdlib", "text")
    if is_bytes:
        prompt = np.frombuffer(args.prompt.encode(), np.uint8).astype(np.int32)
    else:
        prompt = np.array([int(t) for t in args.prompt.split(",") if t.strip()], np.int32)
    toks = generate(model, prompt, length=args.length, seq_len=config.data.seq_len,
                    temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    print(f"# {args.workdir} step {step}, temperature {args.temperature}, top-k {args.top_k}, "
          f"seed {args.seed}", file=sys.stderr)
    if is_bytes:
        sys.stdout.write(args.prompt + bytes(toks.astype(np.uint8)).decode("utf-8", "replace"))
        sys.stdout.write("\n")
    else:
        print(",".join(map(str, toks)))
    return 0


def sample_hf(args) -> int:
    """`main` for a Hugging Face directory: jmoe.hf import, its tokenizer, KV-cache decode."""
    from jmoe.hf import tokenizer as tokenizer_lib  # the optional `tokenizers` dependency

    try:
        cfg, params = hf.load(args.workdir)
        tok = tokenizer_lib.load(args.workdir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ids = tok.encode(args.prompt, add_bos=not args.no_bos)
    out = hf.generate(params, cfg, [ids], max_new_tokens=args.length,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      seed=args.seed)[0].tolist()
    if cfg.eos_token_id in out:
        out = out[:out.index(cfg.eos_token_id)]
    print(f"# {args.workdir} ({cfg.model_type}), temperature {args.temperature}, top-k "
          f"{args.top_k}, top-p {args.top_p}, seed {args.seed}", file=sys.stderr)
    print(tok.decode(ids + out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

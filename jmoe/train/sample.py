"""Generates text from the latest checkpoint of a run.

  python -m jmoe.train.sample runs/NAME --prompt "def main(" --length 400 \
      --temperature 0.8 --top_k 40 --seed 0

The model and vocabulary come from the config saved in the checkpoint. Byte
vocabularies (the stdlib and text sources) print text; token files print ids.
Generation uses a KV cache (`jmoe.generate`: one prefill of the prompt, then
one cached step per token) sized to prompt + `--length` tokens, at most the
run's training window `config.data.seq_len`: longer requests stop there, with
a note on stderr. `--top_p` adds nucleus sampling; `--temperature 0` is greedy.

Given a Hugging Face directory instead (config.json + safetensors +
tokenizer.json; any family `jmoe.hf` imports), it imports it with `jmoe.hf`
and samples with a KV cache (prefill, then one token per step):

  python -m jmoe.sample path/to/hf_dir --prompt "Hello" --length 64 --top_p 0.9

The workdir of a Hugging Face fine-tuning run (configs/hf_finetune.py)
samples that run's HF export (`<workdir>/hf` unless `config.hf.export_dir`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import jax
import numpy as np
from flax import nnx

from jmoe import generate as generate_lib, hf, model as model_lib, model_config
from jmoe.train import checkpoint, hf_model, step as step_lib


class HFRun(Exception):
    """The run directory is a Hugging Face fine-tuning run (not a GPT-MoE's)."""

    def __init__(self, config):
        super().__init__("a Hugging Face fine-tuning run")
        self.config = config


def load(workdir: str, step: Optional[int] = None):
    """(GPT with restored weights, config, step) from a run directory; raises
    `HFRun` for a Hugging Face fine-tuning run (sample its export instead)."""
    step, config = checkpoint.restore_config(workdir, step)
    if hf_model.is_hf(config):
        raise HFRun(config)
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


def generate(model: model_lib.GPT, prompt: np.ndarray, *, length: int, seq_len: int,
             temperature: float = 0.8, top_k: int = 40, top_p: float = 1.0,
             seed: int = 0) -> np.ndarray:
    """The `length` token ids sampled after `prompt` (a newline when it is
    empty), with a KV cache of prompt + `length` slots (`jmoe.generate`).

    seq_len: the model's window; prompt + length must fit in it.
    """
    context = [int(t) for t in prompt] or [ord("\n")]
    if len(context) + length > seq_len:
        raise ValueError(f"generate: prompt ({len(context)} tokens) + length={length} exceeds "
                         f"the model's window seq_len={seq_len}: ask for at most "
                         f"{max(seq_len - len(context), 0)} tokens or shorten the prompt.")
    if length <= 0:
        return np.zeros((0,), np.int64)
    toks = generate_lib.generate(model, [context], max_new_tokens=length,
                                 temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return toks[0].astype(np.int64)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jmoe.sample", description=__doc__.split("\n")[0])
    ap.add_argument("workdir")
    ap.add_argument("--prompt", default="def ", help="text (byte vocab) or comma-separated ids")
    ap.add_argument("--length", type=int, default=300)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top_k", type=int, default=40, help="0: sample from the full distribution")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling (1.0: off)")
    ap.add_argument("--no_bos", action="store_true",
                    help="do not put the checkpoint's BOS id before the prompt (HF)")
    args = ap.parse_args(argv)
    if os.path.exists(os.path.join(args.workdir, "config.json")):
        return sample_hf(args)
    from absl import logging

    logging.set_verbosity(logging.ERROR)  # Orbax notes that a read-only manager is read-only
    try:
        model, config, step = load(args.workdir, args.step)
    except HFRun as run:
        return _sample_hf_run(args, run.config)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    is_bytes = config.data.source in ("stdlib", "text")
    if is_bytes:
        prompt = np.frombuffer(args.prompt.encode(), np.uint8).astype(np.int32)
    else:
        prompt = np.array([int(t) for t in args.prompt.split(",") if t.strip()], np.int32)
    seq_len = config.data.seq_len
    room = seq_len - max(len(prompt), 1)  # an empty prompt starts from a newline
    if room <= 0:
        print(f"error: the prompt has {len(prompt)} tokens and the model's window is "
              f"config.data.seq_len={seq_len}: shorten the prompt.", file=sys.stderr)
        return 1
    length = min(args.length, room)
    try:
        toks = generate(model, prompt, length=length, seq_len=seq_len,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        seed=args.seed)
    except ValueError as e:  # e.g. an unsupported router for cached decoding
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"# {args.workdir} step {step}, temperature {args.temperature}, top-k {args.top_k}, "
          f"top-p {args.top_p}, seed {args.seed}", file=sys.stderr)
    if length < args.length:
        print(f"# stopped after {length} of --length {args.length} tokens: prompt + new tokens "
              f"reached the model's window config.data.seq_len={seq_len} (the KV cache holds "
              f"the whole text, and the model never saw positions past its window).",
              file=sys.stderr)
    if is_bytes:
        sys.stdout.write(args.prompt + bytes(toks.astype(np.uint8)).decode("utf-8", "replace"))
        sys.stdout.write("\n")
    else:
        print(",".join(map(str, toks)))
    return 0


def _sample_hf_run(args, config) -> int:
    """`main` for the workdir of a Hugging Face fine-tuning run
    (configs/hf_finetune.py): samples its HF export, which the trainer
    writes at the end of the run and every `config.hf.export_every` steps."""
    export = hf_model.export_dir(config, args.workdir)
    if args.step is not None:
        print("error: --step picks a checkpoint of a GPT-MoE run; a Hugging Face fine-tuning "
              f"run samples its export ({export}).", file=sys.stderr)
        return 1
    if not os.path.exists(os.path.join(export, "config.json")):
        print(f"error: {args.workdir} is a Hugging Face fine-tuning run without an export yet "
              f"({export}): the trainer writes it when the run ends and every "
              "config.hf.export_every steps.", file=sys.stderr)
        return 1
    print(f"# {args.workdir}: a Hugging Face fine-tuning run; sampling its export {export}",
          file=sys.stderr)
    return sample_hf(argparse.Namespace(**{**vars(args), "workdir": export}))


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

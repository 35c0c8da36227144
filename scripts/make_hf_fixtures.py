"""Builds the tiny Hugging Face checkpoints that tests/test_hf_*.py import.

    pip install torch transformers   # dev-only: the tests never import them
    python scripts/make_hf_fixtures.py            # writes tests/fixtures/hf/
    ONLY=gpt_oss python scripts/make_hf_fixtures.py       # rebuild one fixture
    python scripts/make_hf_fixtures.py --check-export OUT tests/fixtures/hf/mixtral

For each full-model family (Mixtral, Qwen2-MoE, Qwen3-MoE, GPT-OSS,
DeepSeek-V3) it builds a
random-weight model with `save_pretrained` (Qwen3-MoE sharded, so the index
path is covered) and records, for fixed prompts, the fp32 logits and a
32-token greedy continuation (transformers' own `generate`, with its KV
cache). For the DeepSeek-V3 and GPT-OSS MoE *blocks* it saves the block's
weights as transformers holds them in memory (the fused `[E, ...]` layout)
plus an input and its output. Weights are drawn wider than transformers'
init (std 0.02) so the greedy choices are far from ties, and every norm
scale and bias is random so that a weight left out of the import shows.

`--check-export OUT FIXTURE` loads an HF directory written by `jmoe.hf.save`
with transformers and compares its logits to the fixture's recorded ones: the
"exported checkpoint loads in transformers" half of the round trip.
"""

from __future__ import annotations

import argparse
import os
import shutil

import numpy as np
import torch
import transformers as tr
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hf")
VOCAB = 96
NEW_TOKENS = 32
# Two prompts of the same length (the fixtures' batch); ids avoid 0..2 (special).
PROMPTS = np.array([[5, 17, 33, 8, 61, 12, 90, 44, 3, 27, 70, 9],
                    [40, 41, 7, 7, 88, 15, 22, 63, 51, 6, 19, 34]], np.int64)


def _randomize(model: torch.nn.Module, std: float, seed: int) -> None:
    """Every weight N(0, std / sqrt(fan_in)), norms 1 + N(0, 0.1), biases N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1 or "bias" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.05 * torch.randn(b.shape, generator=g))


def _tokenizer(path: str) -> None:
    """A tiny word-level tokenizer over VOCAB ids (tokenizer.json for jmoe.hf.tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, VOCAB)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(words[:3])  # skipped by decode(skip_special_tokens=True)
    tok.save(os.path.join(path, "tokenizer.json"))


def _greedy_gap(model) -> float:
    """Smallest top-1/top-2 logit gap along the greedy continuation of PROMPTS."""
    ids = torch.tensor(PROMPTS)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                             min_new_tokens=NEW_TOKENS, pad_token_id=0, eos_token_id=None)
        full = model(out).logits.float().numpy()[:, PROMPTS.shape[1] - 1:-1]
    top2 = np.sort(full, axis=-1)[..., -2:]
    return float(np.min(top2[..., 1] - top2[..., 0]))


def _record(model, path: str) -> None:
    model.eval()
    ids = torch.tensor(PROMPTS)
    with torch.no_grad():
        logits = model(ids).logits.float().numpy()
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                             min_new_tokens=NEW_TOKENS, pad_token_id=0,
                             eos_token_id=None)
        greedy = out[:, PROMPTS.shape[1]:].numpy()
        # The uncached logits along the greedy path: how far each choice is from a tie.
        full = model(out).logits.float().numpy()
    path_logits = full[:, PROMPTS.shape[1] - 1:-1]
    top2 = np.sort(path_logits, axis=-1)[..., -2:]
    gap = float(np.min(top2[..., 1] - top2[..., 0]))
    np.savez(os.path.join(path, "expected.npz"), prompts=PROMPTS.astype(np.int32),
             logits=logits, greedy=greedy.astype(np.int32), min_greedy_gap=gap)
    print(f"{path}: greedy min top-2 gap {gap:.4f}")


def full_models() -> dict:
    common = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    return {
        # GQA 4:2, RoPE theta 1e6, untied embeddings.
        "mixtral": tr.MixtralConfig(intermediate_size=48, num_hidden_layers=2,
                                    num_local_experts=4, rope_theta=1e6, rms_norm_eps=1e-5,
                                    **common),
        # qkv bias, sigmoid-gated shared expert, no norm_topk_prob, a dense layer
        # (mlp_only_layers) and decoder_sparse_step=1.
        "qwen2_moe": tr.Qwen2MoeConfig(intermediate_size=40, moe_intermediate_size=24,
                                       shared_expert_intermediate_size=36, num_hidden_layers=3,
                                       num_experts=4, mlp_only_layers=[1],
                                       decoder_sparse_step=1, norm_topk_prob=False,
                                       rope_theta=1e4, rms_norm_eps=1e-6, **common),
        # q/k RMSNorm, head_dim != hidden/heads, norm_topk_prob, tied embeddings,
        # decoder_sparse_step=2 (layer 0 dense), sharded safetensors.
        "qwen3_moe": tr.Qwen3MoeConfig(intermediate_size=40, moe_intermediate_size=24,
                                       num_hidden_layers=2, num_experts=8, head_dim=16,
                                       decoder_sparse_step=1, mlp_only_layers=[0],
                                       norm_topk_prob=True, tie_word_embeddings=True,
                                       rope_theta=5e5, rms_norm_eps=1e-6, **common),
        # Attention sinks, q/k/v/o biases, sliding-window layers alternating with full
        # ones (a window of 5, shorter than the prompts), YaRN RoPE, router bias,
        # expert biases, clamped SwiGLU, top-k-then-softmax routing.
        "gpt_oss": tr.GptOssConfig(intermediate_size=24, num_hidden_layers=2,
                                   num_local_experts=4, head_dim=8, sliding_window=5,
                                   swiglu_limit=1.5, rms_norm_eps=1e-5,
                                   rope_parameters={"rope_type": "yarn", "rope_theta": 1e4,
                                                    "factor": 4.0, "beta_fast": 32.0,
                                                    "beta_slow": 1.0, "truncate": False,
                                                    "original_max_position_embeddings": 64},
                                   **common),
        # Multi-head latent attention (q and kv low-rank, compressed kv cache),
        # interleaved RoPE with YaRN mscale, a first dense layer, and the
        # DeepSeek-V3 MoE block (sigmoid router, selection bias, groups, scaling,
        # a shared expert).
        "deepseek_v3": tr.DeepseekV3Config(
            intermediate_size=40, moe_intermediate_size=24, num_hidden_layers=2,
            first_k_dense_replace=1, n_routed_experts=8, n_group=4, topk_group=2,
            n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
            q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
            v_head_dim=8, rope_interleave=True, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                             "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
                             "mscale_all_dim": 1.0, "original_max_position_embeddings": 64},
            **{**common, "num_key_value_heads": 4}),
    }


def moe_blocks() -> dict:
    ds = tr.DeepseekV3Config(hidden_size=32, moe_intermediate_size=24, n_routed_experts=8,
                             num_experts_per_tok=2, n_group=4, topk_group=2,
                             routed_scaling_factor=2.5, n_shared_experts=1, norm_topk_prob=True,
                             vocab_size=VOCAB, num_hidden_layers=1)
    oss = tr.GptOssConfig(hidden_size=32, intermediate_size=24, num_local_experts=8,
                          num_experts_per_tok=2, swiglu_limit=1.5, vocab_size=VOCAB,
                          num_hidden_layers=1)
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
    return {"deepseek_v3_moe": (ds, DeepseekV3MoE), "gpt_oss_moe": (oss, GptOssMLP)}


def build(out: str) -> None:
    torch.manual_seed(0)
    only = os.environ.get("ONLY")  # rebuild one family: ONLY=gpt_oss
    for i, (name, cfg) in enumerate(full_models().items()):
        if only and name != only:
            continue
        path = os.path.join(out, name)
        shutil.rmtree(path, ignore_errors=True)
        cfg.initializer_range = 0.02
        model = tr.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.eval()
        # Of a few random draws keep the one whose greedy path is furthest
        # from a tie, so the 32-token comparison tests the model, not rounding.
        best = max(range(8), key=lambda s: (_randomize(model, 0.25, seed=100 * i + s),
                                            _greedy_gap(model))[1])
        _randomize(model, 0.25, seed=100 * i + best)
        if cfg.tie_word_embeddings:
            model.tie_weights()
        shard = "20KB" if name == "qwen3_moe" else "50MB"
        model.save_pretrained(path, max_shard_size=shard)
        _tokenizer(path)
        _record(model, path)
    for i, (name, (cfg, cls)) in enumerate(moe_blocks().items()):
        if only and name != only:
            continue
        path = os.path.join(out, name)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        block = cls(cfg).float()
        _randomize(block, 0.25, seed=10 + i)
        if name == "gpt_oss_moe":
            with torch.no_grad():  # logits big enough for the clamp (limit) to bite
                block.experts.gate_up_proj.mul_(3.0)
        state = {f"mlp.{k}": v.contiguous() for k, v in block.state_dict().items()}
        save_file(state, os.path.join(path, "model.safetensors"))
        cfg.to_json_file(os.path.join(path, "config.json"))
        g = torch.Generator().manual_seed(20 + i)
        x = torch.randn((2, 12, cfg.hidden_size), generator=g)
        with torch.no_grad():
            y = block(x)
            y = y[0] if isinstance(y, tuple) else y
        np.savez(os.path.join(path, "expected.npz"), x=x.numpy(), y=y.float().numpy())
        print(f"{path}: block |y| {float(y.abs().mean()):.4f}")


def check_export(path: str, fixture: str) -> None:
    """transformers loads the exported `path`; its logits equal the fixture's."""
    model = tr.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    exp = np.load(os.path.join(fixture, "expected.npz"))
    with torch.no_grad():
        logits = model(torch.tensor(exp["prompts"]).long()).logits.numpy()
    err = float(np.max(np.abs(logits - exp["logits"])) / np.max(np.abs(exp["logits"])))
    print(f"{path}: transformers loads it; max rel logit error vs {fixture}: {err:.2e}")
    if err > 1e-5:
        raise SystemExit(f"exported checkpoint {path} does not reproduce {fixture}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--check-export", nargs=2, metavar=("EXPORTED_DIR", "FIXTURE_DIR"))
    args = ap.parse_args()
    if args.check_export:
        check_export(*args.check_export)
    else:
        build(os.path.abspath(args.out))

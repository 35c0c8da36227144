"""Hugging Face interop: import MoE checkpoints, run them, export them back.

    cfg, params = jmoe.hf.load("hf_dir", mesh=mesh)   # Mixtral, Qwen2/3-MoE, GPT-OSS, DeepSeek-V3
    logits_BTV, _, _ = jmoe.hf.forward(params, ids_BT, cfg)
    jmoe.hf.save("out_dir", params, cfg, source="hf_dir")

See docs/huggingface.md.
"""

from jmoe.hf.config import FAMILIES, HFConfig, UnsupportedCheckpoint, load_config
from jmoe.hf.convert import load, save
from jmoe.hf.generation import generate, sample_logits
from jmoe.hf.model import forward, init_cache

__all__ = ["FAMILIES", "HFConfig", "UnsupportedCheckpoint", "load_config", "load", "save",
           "forward", "init_cache", "generate", "sample_logits"]

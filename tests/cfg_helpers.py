"""Config builders for tests: keyword arguments go to the dataclass that owns
them, so a test can write `moe_config(overlap_chunks=2, top_k=1)`."""

import dataclasses

import jmoe
from jmoe import model_config

_EXECUTION = {f.name for f in dataclasses.fields(jmoe.Execution)}
_MODEL_EXECUTION = {f.name for f in dataclasses.fields(model_config.ModelExecution)}


def moe_config(**kw) -> jmoe.MoEConfig:
    ex = {k: kw.pop(k) for k in list(kw) if k in _EXECUTION}
    return jmoe.MoEConfig(**kw, execution=jmoe.Execution(**ex))


def with_execution(cfg: jmoe.MoEConfig, **kw) -> jmoe.MoEConfig:
    """`cfg` with maths fields and execution fields replaced."""
    ex = {k: kw.pop(k) for k in list(kw) if k in _EXECUTION}
    return cfg.replace(**kw).with_execution(**ex)


def gpt_config(fields: dict) -> model_config.GPTConfig:
    """`from_config` of one flat dict holding model and execution fields."""
    ex = {k: v for k, v in fields.items() if k in _EXECUTION | _MODEL_EXECUTION}
    return model_config.from_config({k: v for k, v in fields.items() if k not in ex}, ex)

"""The GPT-MoE trainer: `run(config, workdir)` and its parts.

  data        corpora (stdlib bytes, text, token files) -> Grain iterators
  step        TrainState, AdamW, pure train/eval steps
  mesh        the ('data', 'expert') mesh and the state's partition table
  checkpoint  Orbax manager: state + data position + config
  metrics     progress bar, TensorBoard, metrics.jsonl, MFU
  loop        `run`: validate -> init or restore -> train/eval/save
  sample      `python -m jmoe.train.sample runs/NAME`
"""

from jmoe.train.loop import ConfigError, NonFiniteLoss, run, validate_config

__all__ = ["run", "validate_config", "ConfigError", "NonFiniteLoss"]

r"""Trains a GPT-MoE; the loop lives in jmoe/train/ (intentionally kept short).

  python train.py --config configs/gpt_moe.py
  python train.py --config configs/gpt_moe.py:small --config.model.num_experts=16 \
      --workdir runs/small16

Rerunning the same command resumes from the latest checkpoint in --workdir.
"""

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/gpt_moe.py", "Config file[:variant].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and metrics "
                    "(default: runs/<config name>[_<variant>]).")


def default_workdir(config_arg: str) -> str:
    path, _, variant = config_arg.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", name + ("_" + variant.replace(",", "_") if variant else ""))


def parse_flags(argv):
    """absl flag parsing, with a bad flag or `--config.*` override reported in one line."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        fail(_one_line(str(e)))


def _one_line(msg: str) -> str:
    msg = " ".join(msg.replace("\\n", " ").split())
    if "Traceback" in msg:  # config_flags folds the config file's traceback in
        msg = msg.rsplit("Error: ", 1)[-1]
    hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', msg)
    if hint:
        msg = f"unknown config field {hint.group(2)!r} (did you mean {hint.group(1)!r}?)"
    return msg


def fail(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    from jmoe.train import ConfigError, NonFiniteLoss, run  # after flag parsing

    config_file = flags.FLAGS["config"].config_filename.partition(":")[0]
    if not os.path.isfile(config_file):
        fail(f"--config={config_file}: no such config file.")
    config = flags.FLAGS.config
    workdir = flags.FLAGS.workdir or default_workdir(flags.FLAGS["config"].config_filename)
    try:
        run(config, workdir, distributed=True)
    except (ConfigError, NonFiniteLoss) as e:
        # One line, no traceback: these are the user's to fix (config, data, NaN).
        fail(str(e), code=1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

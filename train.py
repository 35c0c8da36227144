r"""Trains a GPT-MoE; the loop lives in jmoe/train/ (intentionally kept short).

  python train.py --config configs/gpt_moe.py
  python train.py --config configs/gpt_moe.py:small --config.model.num_experts=16 \
      --workdir runs/small16

Rerunning the same command resumes from the latest checkpoint in --workdir.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from jmoe.train import cli

config_flags.DEFINE_config_file("config", "configs/gpt_moe.py", "Config file[:variant].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and metrics "
                    "(default: runs/<config name>[_<variant>]).")
flags.DEFINE_bool("gpu_overlap_flags", True, "On GPU, add the XLA flags for the latency-hiding "
                  "scheduler and async collectives that the installed jaxlib supports "
                  "(jmoe.runtime.xla_flags); nothing is added on CPU.")
cli.define_distributed_flags()  # --coordinator_address etc.; SLURM needs none


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    from jmoe.runtime.distributed import DistributedError, exit_promptly_on_error
    from jmoe.train import ConfigError, NonFiniteLoss, run

    cli.config_file()
    # Before anything starts a JAX backend: XLA reads its flags once.
    from jmoe.runtime import xla_flags
    xla_flags.configure_cpu_workarounds()
    if flags.FLAGS.gpu_overlap_flags:
        added = xla_flags.configure_gpu_overlap()
        if added and os.environ.get("SLURM_PROCID", "0") == "0":
            print("XLA flags for overlap: " + " ".join(added), flush=True)
    workdir = flags.FLAGS.workdir or cli.default_workdir(flags.FLAGS["config"].config_filename)
    user_errors = (ConfigError, NonFiniteLoss, DistributedError)
    try:
        # Any other error on one of several processes ends it at once, so the
        # others are stopped promptly instead of waiting for it in a collective.
        with exit_promptly_on_error(expected=user_errors):
            run(flags.FLAGS.config, workdir, distributed=cli.distributed_options())
    except user_errors as e:
        # One line, no traceback: these are the user's to fix (config, data, NaN).
        cli.fail(str(e), code=1)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)

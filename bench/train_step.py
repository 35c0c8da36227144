"""Train-step benchmark: the default GPT-MoE against its dense equivalent.

    python bench/train_step.py --json bench/results/train_step.json
    python bench/train_step.py --config configs/gpt_moe.py:small --rounds 6

Same flags as `python -m jmoe.train.bench` (the implementation lives there,
next to the trainer it times): step time and tokens/s of each model, the MoE
tax as the median ratio of neighbouring rounds, peak RSS, JSON.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app  # noqa: E402

from jmoe.sharding.xla_flags import configure_cpu_workarounds  # noqa: E402
from jmoe.train import bench  # noqa: E402

if __name__ == "__main__":
    configure_cpu_workarounds()
    app.run(bench.main)

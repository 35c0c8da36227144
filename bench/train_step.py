"""Train-step benchmark: the default GPT-MoE against its dense equivalent.

    python bench/train_step.py --json bench/results/train_step.json
    python bench/train_step.py --config configs/gpt_moe.py:small --rounds 6

Same flags as `python -m jmoe.train.bench` (the implementation lives there,
next to the trainer it times): step time and tokens/s of each model, the MoE
tax as the median ratio of neighbouring rounds, peak RSS, JSON.
"""

from absl import app

import harness
from jmoe.train import bench

if __name__ == "__main__":
    harness.setup()  # before the first computation
    app.run(bench.main)

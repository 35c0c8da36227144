"""Train-step benchmark: the MoE model against its dense equivalent.

  python -m jmoe.train.bench --json bench/results/train_step.json
  python -m jmoe.train.bench --config configs/gpt_moe.py --config.batch_size=16 --rounds 6

Times the jitted train step of a config and of the same config with
`model.dense=True` (every MoE FFN replaced by a dense FFN of equal active
parameters), alternating between the two in one process so a noisy shared
machine slows both alike. The MoE tax is the median over rounds of the
ratio of the two neighbouring timings (robust to load that comes and goes);
the step times reported are each model's fastest round. Also prints peak RSS,
and writes everything as JSON.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/gpt_moe.py", "Config file[:variant].")
flags.DEFINE_integer("steps", 1, "Timed steps per model per round.")
flags.DEFINE_integer("rounds", 12, "Alternating rounds (MoE, dense, MoE, dense, ...).")
flags.DEFINE_string("json", "", "Write the results here.")
FLAGS = flags.FLAGS


def build(config):
    """(jitted step, state, batch, tokens per step) for one config on the mesh."""
    from jmoe import model as model_lib
    from jmoe.sharding import make_mesh
    from jmoe.train import data, loop, mesh as mesh_lib, step as step_lib

    gpt = loop.validate_config(config)
    mesh = make_mesh(config.mesh, owner="config.mesh")
    loop.validate_mesh(config, gpt, mesh)
    tx = step_lib.make_optimizer(config.opt, config.total_steps)
    schedule = step_lib.make_schedule(config.opt, config.total_steps)
    init = step_lib.make_init(gpt, tx, config.seed)
    shardings = mesh_lib.state_shardings(mesh, jax.eval_shape(init),
                                         fsdp=config.mesh.get("fsdp", False))
    bsh = mesh_lib.batch_sharding(mesh)
    with jax.set_mesh(mesh):
        state = model_lib.compile_init(jax.jit(init, out_shardings=shardings))()
        train_fn, _ = step_lib.jit_steps(shardings, bsh, step_lib.graphdef_of(gpt), tx,
                                         schedule, step_lib.step_config(config))
    # A real batch: routing (and so the experts' group sizes) as in training.
    b, t = config.batch_size, config.data.seq_len
    corpus = data.load_corpus(config.data, gpt.vocab_size)
    rows = data.train_iterator(corpus.train, seq_len=t, global_batch=b, seed=config.seed)
    batch = data.to_global(next(rows), bsh, b)
    return mesh, train_fn, state, batch, b * t


def main(argv) -> None:
    del argv
    runs = {}
    for name, dense in (("moe", False), ("dense", True)):
        config = copy.deepcopy(FLAGS.config)
        config.model.dense = dense
        t0 = time.perf_counter()
        mesh, fn, state, batch, tokens = build(config)
        with jax.set_mesh(mesh):
            state, m = fn(state, batch)
            jax.block_until_ready(m)
        runs[name] = dict(mesh=mesh, fn=fn, state=state, batch=batch, tokens=tokens,
                          compile_s=time.perf_counter() - t0, times=[])

    # Alternate the two models round by round: load from other processes on a
    # shared machine then hits both alike.
    for _ in range(FLAGS.rounds):
        for r in runs.values():
            with jax.set_mesh(r["mesh"]):
                state = r["state"]
                t0 = time.perf_counter()
                for _ in range(FLAGS.steps):
                    state, m = r["fn"](state, r["batch"])
                jax.block_until_ready((state, m))
                r["times"].append((time.perf_counter() - t0) / FLAGS.steps)
                r["state"] = state

    out = {"config": FLAGS["config"].config_filename, "model": FLAGS.config.model.to_dict(),
           "batch_size": FLAGS.config.batch_size, "seq_len": FLAGS.config.data.seq_len,
           "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}
    for name, r in runs.items():
        step_s = float(np.min(r["times"]))
        out[name] = {"step_s": step_s, "step_s_median": float(np.median(r["times"])),
                     "tokens_per_s": r["tokens"] / step_s, "compile_s": r["compile_s"]}
    ratios = np.array(runs["moe"]["times"]) / np.array(runs["dense"]["times"])
    out["moe_over_dense"] = float(np.median(ratios))
    out["moe_over_dense_best"] = out["moe"]["step_s"] / out["dense"]["step_s"]
    out["moe_over_dense_rounds"] = ratios.tolist()
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{'model':<8}{'step (s)':>10}{'tokens/s':>12}{'compile (s)':>13}")
    for name in ("moe", "dense"):
        r = out[name]
        print(f"{name:<8}{r['step_s']:>10.4f}{r['tokens_per_s']:>12,.0f}{r['compile_s']:>13.1f}")
    print(f"MoE / dense step time: {out['moe_over_dense']:.3f}x (median of {len(ratios)} "
          f"paired rounds; fastest rounds {out['moe_over_dense_best']:.3f}x)   peak RSS "
          f"{out['peak_rss_mb']:.0f} MB")
    if FLAGS.json:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
        with open(FLAGS.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    from jmoe.runtime.xla_flags import configure_cpu_workarounds
    configure_cpu_workarounds()  # before the first computation
    app.run(main)

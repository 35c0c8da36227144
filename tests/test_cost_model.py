"""The cost model's sanity properties, the planner CLI, and its overrides
against the trainer's own config validation (no device work, no compiles)."""

import contextlib
import io
import itertools
import os
import subprocess
import sys

import pytest
from absl import flags
from jax.sharding import AbstractMesh
from ml_collections import config_flags

from cfg_helpers import moe_config, with_execution
from jmoe.model_config import from_config
from jmoe.planner import cli, hardware
from jmoe.planner.layer_cost import moe_layer_cost
from jmoe.planner.load import load_distribution
from jmoe.planner.primitives import all_to_all_time, pipeline_time
from jmoe.planner.step_cost import Setting, step_cost
from jmoe.sharding.checks import check_layer_on_mesh
from jmoe.train import validate_config
from jmoe.train.loop import validate_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = "configs/gpt_moe.py"
H100 = hardware.PROFILES["h100"]


def _moe(**kw):
    base = dict(d_model=1024, d_ff=2048, num_experts=16, top_k=2, dispatch="capacity",
                dtype="bfloat16")
    base.update(kw)
    return moe_config(**base)


LAYER_CASES = [
    # (moe overrides, tokens per device, ep)
    (dict(), 8192, 8),
    (dict(), 8192, 16),
    (dict(dispatch="dropless"), 8192, 8),
    (dict(dispatch="dropless", ep_recv_factor=1.5), 4096, 16),
    (dict(d_model=4096, d_ff=14336, num_experts=8), 32768, 8),
    (dict(d_model=256, d_ff=512, num_experts=64, top_k=6), 2048, 32),
    (dict(a2a_hierarchy=8), 4096, 32),
]


def _faster(hw, factor=2.0):
    """`hw` with every bandwidth and peak raised (latencies unchanged)."""
    return hw.replace(mem_bw=hw.mem_bw * factor, intra_bw=hw.intra_bw * factor,
                      inter_bw=hw.inter_bw * factor,
                      peak_flops={k: v * factor for k, v in hw.peak_flops.items()})


@pytest.mark.parametrize("kw,tokens,ep", LAYER_CASES)
@pytest.mark.parametrize("chunks", [1, 2, 4, 8])
def test_more_bandwidth_never_predicts_more_time(kw, tokens, ep, chunks):
    cfg = _moe(overlap_chunks=chunks, **kw)
    base = moe_layer_cost(cfg, tokens, ep, H100).time
    for field in ("intra_bw", "inter_bw", "mem_bw"):
        hw = H100.replace(**{field: getattr(H100, field) * 4})
        assert moe_layer_cost(cfg, tokens, ep, hw).time <= base * (1 + 1e-12), field
    assert moe_layer_cost(cfg, tokens, ep, _faster(H100)).time <= base


@pytest.mark.parametrize("kw,tokens,ep", LAYER_CASES)
@pytest.mark.parametrize("chunks", [1, 2, 3, 4, 8])
def test_overlap_never_predicts_more_than_no_overlap(kw, tokens, ep, chunks):
    cfg = _moe(overlap_chunks=chunks, **kw)
    with_overlap = moe_layer_cost(cfg, tokens, ep, H100)
    without = moe_layer_cost(cfg, tokens, ep, H100.replace(async_collectives=False))
    assert with_overlap.time <= without.time * (1 + 1e-12)
    assert without.time == pytest.approx(without.serial, rel=1e-12)
    assert with_overlap.hidden >= 0.0


@pytest.mark.parametrize("kw,tokens,ep", LAYER_CASES)
def test_one_chunk_equals_no_overlap(kw, tokens, ep):
    one = moe_layer_cost(_moe(overlap_chunks=1, **kw), tokens, ep, H100)
    sync = moe_layer_cost(_moe(overlap_chunks=1, **kw), tokens, ep,
                          H100.replace(async_collectives=False))
    assert one.time == pytest.approx(one.serial, rel=1e-12)
    assert one.time == pytest.approx(sync.time, rel=1e-12)
    assert one.hidden == pytest.approx(0.0, abs=1e-15)


def test_overlap_hides_communication_when_chunks_are_cheap():
    """With fixed per-chunk costs at zero, more chunks hide more (never less)."""
    hw = H100.replace(intra_alpha=0.0, intra_peer=0.0, inter_alpha=0.0, inter_peer=0.0,
                      kernel_overhead=0.0)
    times = [moe_layer_cost(_moe(overlap_chunks=n, d_model=4096, d_ff=14336, num_experts=8),
                            32768, 8, hw).time for n in (1, 2, 4, 8)]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(times, times[1:]))
    assert times[-1] < times[0]


@pytest.mark.parametrize("kw,tokens,ep", LAYER_CASES)
def test_doubling_tokens_roughly_doubles_compute(kw, tokens, ep):
    # At training sizes (>= 16K tokens per device): below that, fixed costs
    # (reading each expert's weights, kernel launches) are a visible share.
    tokens = max(tokens, 16384)
    one = moe_layer_cost(_moe(**kw), tokens, ep, H100).compute
    two = moe_layer_cost(_moe(**kw), 2 * tokens, ep, H100).compute
    assert 1.7 < two / one < 2.3


def test_doubling_tokens_roughly_doubles_step_compute():
    config = _load("mixtral_8x7b")
    gpt = from_config(config.model, config.execution)
    s = Setting(8, "capacity", 1.25, 1, 0)
    one = step_cost(gpt, s, seq_len=4096, batch_size=512, devices=32, hw=H100)
    two = step_cost(gpt, s, seq_len=4096, batch_size=1024, devices=32, hw=H100)
    assert 1.8 < (two.compute - two.optimizer) / (one.compute - one.optimizer) < 2.2


@pytest.mark.parametrize("ep,accum", [(8, 1), (8, 4), (2, 2)])
def test_fsdp_trades_communication_for_memory(ep, accum):
    """ZeRO-3 sharding cuts the per-device state by the data-axis size; it
    moves more bytes (gathers every micro-batch), so with synchronous
    collectives it never predicts less time, and with async ones it never
    exposes less communication than it moves."""
    config = _load("mixtral_8x7b")
    gpt = from_config(config.model, config.execution)
    devices = 32
    for hw in (H100, H100.replace(async_collectives=False)):
        plain, sharded = (step_cost(gpt, Setting(ep, "capacity", 1.25, 1, 0, 0.0, accum, z),
                                    seq_len=4096, batch_size=512, devices=devices, hw=hw)
                          for z in (False, True))
        dp = devices // ep
        assert sharded.memory["params_per_device"] == pytest.approx(
            plain.memory["params_per_device"] / dp)
        assert sharded.memory["state"] < plain.memory["state"] / (dp / 2)
        assert sharded.comm > plain.comm
        assert sharded.exposed_comm <= sharded.comm + 1e-12
        if not hw.async_collectives:
            assert sharded.time > plain.time
    # One device per expert-parallel group: nothing to shard over `data`.
    one = step_cost(gpt, Setting(32, "capacity", 1.25, 1, 0, 0.0, 1, True), seq_len=4096,
                    batch_size=512, devices=32, hw=H100)
    flat = step_cost(gpt, Setting(32, "capacity", 1.25, 1, 0, 0.0, 1, False), seq_len=4096,
                     batch_size=512, devices=32, hw=H100)
    assert one.memory == flat.memory and one.time == pytest.approx(flat.time)


def test_planner_recommends_fsdp_only_when_memory_needs_it():
    """fp32 Mixtral on 4 x 8 H100 does not fit replicated at any accumulation,
    so the plan shards it; with bf16 parameters and flash attention (no
    [B, H, S, S] scores kept: `--set attention=flash`) it fits without."""
    fp32, text = _plan("mixtral_8x7b", "h100", 4)
    assert fp32["best"].setting.fsdp and "--config.mesh.fsdp=True" in fp32["overrides"]
    assert fp32["best"].memory["total"] <= H100.mem_bytes and not fp32["notes"]
    bf16, _ = _plan("mixtral_8x7b", "h100", 4, "--config.model.param_dtype=bfloat16",
                    "--set", "attention=flash")
    assert not bf16["best"].setting.fsdp


def test_pipeline_bounds():
    for n, a, c, b in itertools.product((1, 2, 5), (0.0, 1.0, 3.0), (0.5, 2.0), (0.0, 1.5)):
        t = pipeline_time([a] * n, [c] * n, [b] * n, overlap=True)
        serial = n * (a + c + b)
        assert t <= serial + 1e-12
        assert t >= max(n * (a + b), n * c) - 1e-12
        if n == 1:
            assert t == pytest.approx(serial)


def test_hierarchical_wins_only_when_inter_node_link_is_the_bottleneck():
    wins = 0
    for (inter_gbit, peer_us, nbytes, ep) in itertools.product(
            (25, 100, 400, 3600), (0.5, 2.0, 8.0), (1e4, 1e5, 1e6, 1e7, 1e8), (16, 32, 64)):
        hw = H100.replace(inter_bw=inter_gbit * hardware.GBIT, inter_peer=peer_us * 1e-6)
        flat = all_to_all_time(nbytes, ep, hw)
        two = all_to_all_time(nbytes, ep, hw, hierarchy=8)
        if two["time"] < flat["time"]:
            wins += 1
            assert flat["inter"] > flat["intra"], (inter_gbit, peer_us, nbytes, ep)
    assert wins > 0  # it does win somewhere: many nodes, small messages
    # Inter-node as fast as NVLink and messages large enough that per-message
    # costs do not matter: flat is never beaten.
    hw = H100.replace(inter_bw=H100.intra_bw, inter_peer=H100.intra_peer,
                      inter_alpha=H100.intra_alpha)
    for nbytes, ep in itertools.product((1e7, 1e8, 1e9), (16, 32, 64)):
        assert all_to_all_time(nbytes, ep, hw, 8)["time"] >= all_to_all_time(nbytes, ep, hw)["time"]
    # Inside one node there is nothing to gain.
    for nbytes in (1e4, 1e6, 1e8):
        assert all_to_all_time(nbytes, 8, H100, 4)["time"] >= all_to_all_time(nbytes, 8, H100)["time"]


def test_imbalance_costs_dropless_time_and_capacity_drops():
    e = 16
    hot = load_distribution("hot:4", e)
    assert sum(hot) == pytest.approx(1.0) and hot[0] == pytest.approx(4 / e)
    dl = _moe(dispatch="dropless")
    assert (moe_layer_cost(dl, 8192, 8, H100, load_E=hot).time
            > moe_layer_cost(dl, 8192, 8, H100).time)
    cap = _moe(dispatch="capacity", capacity_factor=1.25)
    uni = moe_layer_cost(cap, 8192, 8, H100).drop_fraction
    skew = moe_layer_cost(cap, 8192, 8, H100, load_E=hot).drop_fraction
    assert uni < 0.01 < skew
    # Static shapes: the capacity path's time does not depend on the load.
    assert (moe_layer_cost(cap, 8192, 8, H100, load_E=hot).time
            == pytest.approx(moe_layer_cost(cap, 8192, 8, H100).time))
    assert load_distribution("zipf:1.0", 4)[0] > 0.4
    with pytest.raises(ValueError, match="num_experts"):
        load_distribution("1,2,3", 4)


def test_profiles_have_sources_and_sane_numbers():
    for name, hw in hardware.PROFILES.items():
        assert hw.sources, name
        assert hw.intra_bw > hw.inter_bw, name
        assert hw.flops("bfloat16") >= hw.flops("float32"), name
    assert hardware.PROFILES["h200"].mem_bw > hardware.PROFILES["h100"].mem_bw
    assert hardware.PROFILES["a800"].intra_bw < hardware.PROFILES["a100"].intra_bw
    hw = hardware.get("h100", inter_bw_gbit="200", mm_eff="0.5")
    assert hw.inter_bw == pytest.approx(25e9) and hw.mm_eff == 0.5
    with pytest.raises(ValueError, match="unknown"):
        hardware.get("tpu-v9")


# ----------------------------------------------------- planner and overrides --

def _flag_values(argv):
    """Parses like train.py: a locked config file flag plus `--config.*` overrides."""
    argv = ["train.py"] + list(argv)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", CONFIG, "", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    return fv


def _load(variant):
    return _flag_values([f"--config={CONFIG}:{variant}"]).config


# (variant, hardware, nodes): every shipped variant on a cluster it can use.
SHIPPED = [("default", "h100", 1), ("small", "a100", 1), ("medium", "a800", 2),
           ("mixtral_8x7b", "h100", 4), ("deepseek", "h200", 2), ("default,dense", "a30", 1)]


def _plan(variant, hw, nodes, *extra):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = cli.run(["plan", f"--config={CONFIG}:{variant}", f"--hardware={hw}",
                           f"--nodes={nodes}", *extra])
    return result, out.getvalue()


@pytest.mark.parametrize("variant,hw,nodes", SHIPPED)
def test_recommended_overrides_pass_the_trainers_validation(variant, hw, nodes, tmp_path):
    result, text = _plan(variant, hw, nodes)
    ovr = result["overrides"]
    assert "Recommended overrides" in text
    tokens = tmp_path / "tokens.bin"
    tokens.write_bytes(b"\0" * 64)
    # Exactly what train.py does with the flags (locked config, absl parsing),
    # plus a data path for the variants that train on a user's token file.
    config = _flag_values([f"--config={CONFIG}:{variant}", *ovr,
                           f"--config.data.path={tokens}"]).config
    gpt = validate_config(config)
    devices = nodes * hardware.get(hw).devices_per_node
    expert = config.mesh.expert
    data = config.mesh.data if config.mesh.data != -1 else devices // expert
    assert data * expert * config.mesh.get("tensor", 1) == devices
    mesh = AbstractMesh((data, expert, 1), ("data", "expert", "tensor"))
    validate_mesh(config, gpt, mesh)
    if gpt.moe is not None and not gpt.dense:
        micro = config.batch_size // config.grad_accum_steps * config.data.seq_len
        check_layer_on_mesh(gpt.moe, mesh, micro)
    best = result["best"].setting
    assert expert == best.ep and config.grad_accum_steps == best.grad_accum_steps
    assert bool(config.mesh.fsdp) == best.fsdp
    if gpt.moe is not None:
        assert gpt.moe.dispatch == best.dispatch
        for key in ("overlap_chunks", "a2a_hierarchy"):
            assert getattr(gpt.moe.execution, key) == getattr(best, key), key


def test_overrides_name_the_section_that_owns_each_field():
    """Maths fields go to config.model, execution fields to config.execution,
    and the current plan is read from the same sections."""
    config = _flag_values([f"--config={CONFIG}:mixtral_8x7b",
                           "--config.execution.overlap_chunks=2",
                           "--config.model.ep_recv_factor=1.5"]).config
    cur = cli.current_setting(config, 32)
    assert (cur.ep, cur.overlap_chunks, cur.ep_recv_factor) == (8, 2, 1.5)
    best = Setting(8, "capacity", 1.1, 4, 8, 0.0, 2, False)
    assert cli.overrides(config, best, 32) == [
        "--config.model.dispatch=capacity", "--config.model.capacity_factor=1.1",
        "--config.execution.overlap_chunks=4", "--config.execution.a2a_hierarchy=8",
        "--config.model.ep_recv_factor=0.0", "--config.grad_accum_steps=2"]
    assert cli.overrides(config, cur, 32) == []
    # Setting.layer puts each knob where the layer reads it.
    shipped = from_config(config.model, config.execution).moe
    assert best.layer(shipped) == with_execution(
        shipped, dispatch="capacity", capacity_factor=1.1, ep_recv_factor=0.0,
        overlap_chunks=4, a2a_hierarchy=8)


def test_plan_cli_worked_example_prints_the_breakdown():
    result, text = _plan("mixtral_8x7b", "h100", 4, "--config.model.param_dtype=bfloat16")
    for line in ("compute", "exposed communication", "overlapped communication",
                 "all-to-all share of step", "a2a_dispatch", "experts", "attn_core"):
        assert line in text, line
    best, cur = result["best"], result["current"]
    # The plan is never slower than the shipped config, unless that one does
    # not fit in memory (then the plan is the fastest one that does).
    assert best.time <= cur.time or cur.memory["total"] > H100.mem_bytes
    assert best.memory["total"] <= H100.mem_bytes  # bf16 params fit after planning
    assert best.drop_fraction <= 0.01


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="hardware"):
        _plan("default", "tpu-v9", 1)
    with pytest.raises(ValueError, match="num_experts"):
        _plan("default", "h100", 1, "--config.model.top_k=99")


def test_plan_help_prints_usage_and_exits_zero():
    """`python -m jmoe.plan --help` (absl defines --help only for absl.app)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-m", "jmoe.plan", "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    for text in ("python -m jmoe.plan --config", "--hardware", "--nodes", "--load", "--set"):
        assert text in res.stdout, text
    assert "Unknown command line flag" not in res.stdout + res.stderr

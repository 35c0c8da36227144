"""`Execution.gmm_tiling`: the Pallas grouped matmul's shipped tiling class
picked per config (a plan of the adaptive switch on a GPU). It changes the
kernels' tiles, never the layer's function."""

import jax
import jax.numpy as jnp
import pytest

import jmoe
from checks import assert_tree_close
from jmoe.sharding import make_mesh
from jmoe.train import loop, plans
from test_train import tiny_config

D, F, E, T = 32, 64, 4, 64


def _cfg(**ex):
    return jmoe.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=2, group_align=16,
                          execution=jmoe.Execution(**ex))


def _fwd_bwd(cfg):
    def run(p, x):
        (y, _), vjp = jax.vjp(lambda p, x: jmoe.moe_apply(p, x, cfg), p, x)
        return y, vjp((jnp.cos(y), jax.tree.map(jnp.zeros_like, _)))
    return jax.jit(run)


def _inputs():
    params = jmoe.init_params(jax.random.key(0), _cfg())
    return params, jax.random.normal(jax.random.key(1), (T, D))


@pytest.mark.parametrize("tiling", ["wide", "narrow"])
def test_each_tiling_computes_the_xla_layer(tiling):
    """Pallas (interpret mode here) with either shipped class: forward and
    every gradient equal the XLA grouped matmul's layer."""
    params, x = _inputs()
    want = _fwd_bwd(_cfg(gmm_backend="xla"))(params, x)
    got = _fwd_bwd(_cfg(gmm_backend="pallas", gmm_tiling=tiling))(params, x)
    assert_tree_close(got, want)


def _cuda_text(cfg):
    params, x = _inputs()
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, x))
    return _fwd_bwd(cfg).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


def test_the_tiling_takes_effect_in_the_cuda_lowering(monkeypatch):
    """The Triton kernels the layer lowers to differ between the classes;
    `auto` takes `narrow` for these shapes (min(D, F) < 256)."""
    # Traced as on a GPU: the Pallas kernels compile for Triton instead of
    # running in interpret mode.
    monkeypatch.setattr(jax, "default_backend", lambda: "cuda")
    wide, narrow = (_cuda_text(_cfg(gmm_backend="pallas", gmm_tiling=t))
                    for t in ("wide", "narrow"))
    auto = _cuda_text(_cfg(gmm_backend="pallas"))
    assert wide.count("__gpu$xla.gpu.triton") == narrow.count("__gpu$xla.gpu.triton") > 0
    assert wide != narrow and auto == narrow


def test_on_a_gpu_the_adaptive_shortlist_times_the_other_tiling(monkeypatch):
    """With the Pallas grouped matmul (a GPU), the shortlist includes the
    config's plan with the shipped tiling that `auto` does not pick; not on
    the CPU."""
    config = tiny_config()  # d_model 32: auto picks narrow
    gpt = loop.validate_config(config)
    mesh = make_mesh(config.mesh, owner="config.mesh")
    ac = plans.AdaptiveConfig(plans=4)
    assert not [n for n in plans.shortlist(ac, gpt, config, mesh) if "gmm_tiling" in n]
    monkeypatch.setattr(jax, "default_backend", lambda: "cuda")
    shortlist = plans.shortlist(ac, gpt, config, mesh)
    assert len(shortlist) == 4
    assert shortlist["chunks=1 flat gmm_tiling=wide"].moe.execution.gmm_tiling == "wide"
    assert all(g.moe.maths() == gpt.moe.maths() for g in shortlist.values())


def test_an_unknown_tiling_fails_naming_the_field():
    with pytest.raises(ValueError, match="gmm_tiling='huge' is invalid"):
        _cfg(gmm_tiling="huge")

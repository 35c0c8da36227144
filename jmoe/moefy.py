"""`moefy`: turn the MLPs of someone else's Flax model into jmoe MoE layers.

NNX (module surgery, in place):

    paths = jmoe.moefy(model, cfg, mlp=MLP, where="blocks/[13]/mlp",
                       rngs=nnx.Rngs(params=0))

Linen (a subclass whose `init`/`apply` run every matching MLP as an MoE):

    MoEModel = jmoe.moefy(Model, cfg, mlp=MlpBlock, where=r"layers_\\d+/mlp")

Sparse upcycling (Komatsuzaki et al., 2022): with `upcycle=`, a function
from one dense MLP to its weights `{"w_gate_DF", "w_up_DF", "w_down_FD"}`
(no biases; `w_gate_DF` for gated activations), every expert starts as a copy
of the MLP it replaces (plus `noise` * the weight's std of Gaussian noise) and
the router as `router_std` * N(0, 1) -- zero by default. With a zero router
every expert is equally likely, so when the K combine weights sum to one
(`renormalize=True`, `routed_scaling_factor=1`) the upcycled layer computes
exactly the dense MLP; training then breaks the symmetry.

`where` picks layers by path ("blocks/1/mlp" in NNX, the Linen scope path
"layers_1/mlp"): a regular expression the whole path must match, or a
predicate `where(path) -> bool`; None takes every MLP.
"""

from __future__ import annotations

import contextvars
import re
from typing import Any, Callable, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jmoe import linen as jmoe_linen
from jmoe.config import GATED_ACTIVATIONS, MoEConfig
from jmoe.moe import MoE

Where = Union[None, str, Callable[[str], bool]]
ConfigFor = Union[MoEConfig, Callable[[str], MoEConfig]]


def moefy(target, cfg: ConfigFor, *, mlp: Any = None, where: Where = None,
          rngs: Optional[nnx.Rngs] = None, upcycle: Optional[Callable[[Any], Mapping]] = None,
          noise: float = 0.0, router_std: float = 0.0, key: Optional[jax.Array] = None,
          return_aux: bool = False):
    """Replaces matching MLPs of `target` by MoE layers.

    Args:
      target: an `nnx.Module` instance (changed in place; returns the list of
        replaced paths) or a Linen `nn.Module` class (returns a subclass).
      cfg: the `MoEConfig` of every new layer, or `cfg(path)` giving one per
        layer. With `upcycle`, `d_model` and `d_ff` are read from the dense
        weights, so the config's sizes are only a template.
      mlp: the MLP class to replace (Linen: required; NNX: a class or a
        predicate `mlp(module) -> bool`; None = every module `where` matches).
      where: a path pattern or predicate (module docstring); None = all.
      rngs: NNX: initialises the new layers (`params`; a `dropout` stream
        feeds router jitter).
      upcycle: NNX: `upcycle(dense_module) -> {"w_up_DF", "w_down_FD"[, "w_gate_DF"]}`;
        Linen: use `upcycle_params` on the dense model's variables instead.
      noise, router_std, key: the upcycled experts' noise, the router's
        initial scale, and the key drawing both.
      return_aux: False (default) makes each layer return only `y`, like the
        MLP it replaces, and sow its `MoEAux` (collect with `jmoe.aux_loss`).
    """
    if isinstance(target, type) and issubclass(target, nn.Module):
        if mlp is None:
            raise ValueError("moefy of a Linen module class needs mlp=<the MLP class to "
                             "replace>: Linen builds submodules inside calls, so jmoe "
                             "finds them by class.")
        if upcycle is not None:
            raise ValueError("moefy(upcycle=...) works on NNX models; for Linen, initialise "
                             "the dense model and convert its variables with "
                             "jmoe.upcycle_params(...).")
        return linen_class(target, cfg, mlp=mlp, where=where, return_aux=return_aux)
    if isinstance(target, nnx.Module):
        if mlp is None and where is None:
            raise ValueError("moefy needs mlp= (the MLP class or a predicate on modules) "
                             "or where= (a path pattern): with neither it would replace "
                             "every submodule.")
        if rngs is None:
            raise ValueError("moefy of an NNX model needs rngs=nnx.Rngs(params=...) to "
                             "build the new layers.")
        return _moefy_nnx(target, cfg, mlp, where, rngs, upcycle, noise, router_std,
                          key if key is not None else jax.random.key(0), return_aux)
    raise TypeError(f"moefy takes an nnx.Module instance or a flax.linen Module class, "
                    f"not {type(target).__name__}.")


# ----------------------------------------------------------- upcycling ----

def upcycled_params(dense: Mapping[str, jax.Array], cfg: MoEConfig, key: jax.Array,
                    noise: float = 0.0, router_std: float = 0.0) -> dict:
    """`jmoe.init_params`-shaped weights whose E experts copy one dense MLP.

    dense: `w_up_DF` [D, F], `w_down_FD` [F, D] and, for gated activations,
    `w_gate_DF` [D, F]. Returns {"router": {"w_DE"}, "experts": {...}} in
    `cfg.param_dtype` (shared experts are not touched: see `moefy`).
    """
    want = {"w_up_DF", "w_down_FD"} | ({"w_gate_DF"} if cfg.activation in GATED_ACTIVATIONS
                                       else set())
    if set(dense) != want:
        raise ValueError(
            f"upcycle weights have keys {sorted(dense)} but MoEConfig.activation="
            f"{cfg.activation!r} needs exactly {sorted(want)} (no biases: jmoe's experts "
            "have none); return those from the upcycle function, or change activation.")
    d, f = dense["w_up_DF"].shape
    if (d, f) != (cfg.d_model, cfg.d_ff):
        raise ValueError(f"upcycle weights are [D={d}, F={f}] but MoEConfig has d_model="
                         f"{cfg.d_model}, d_ff={cfg.d_ff}: set them to the MLP's sizes.")
    e, dt = cfg.num_experts, jnp.dtype(cfg.param_dtype)
    k_router, *k_w = jax.random.split(key, 1 + len(want))
    experts = {}
    for k, name in zip(k_w, sorted(want)):
        w = jnp.asarray(dense[name], jnp.float32)
        w_E = jnp.broadcast_to(w, (e,) + w.shape)
        if noise:
            w_E = w_E + noise * jnp.std(w) * jax.random.normal(k, w_E.shape, jnp.float32)
        experts[name.replace("_DF", "_EDF").replace("_FD", "_EFD")] = w_E.astype(dt)
    w_DE = router_std * jax.random.normal(k_router, (d, e), jnp.float32)
    return {"router": {"w_DE": w_DE.astype(dt)}, "experts": experts}


def _sized(cfg: MoEConfig, dense: Optional[Mapping]) -> MoEConfig:
    """The config with the dense MLP's D and F (a template's sizes ignored)."""
    if dense is None or "w_up_DF" not in dense:
        return cfg
    d, f = dense["w_up_DF"].shape
    return cfg.replace(d_model=int(d), d_ff=int(f))


def _matcher(where: Where) -> Callable[[str], bool]:
    if where is None:
        return lambda path: True
    if isinstance(where, str):
        pattern = re.compile(where)
        return lambda path: pattern.fullmatch(path) is not None
    return where


# ----------------------------------------------------------------- NNX ----

def _moefy_nnx(model: nnx.Module, cfg: ConfigFor, mlp, where: Where, rngs: nnx.Rngs,
               upcycle, noise: float, router_std: float, key: jax.Array,
               return_aux: bool) -> list:
    matches = _matcher(where)
    is_mlp = (mlp if callable(mlp) and not isinstance(mlp, type)
              else (lambda m: True) if mlp is None else (lambda m: isinstance(m, mlp)))
    # Collect first: the tree changes under us otherwise. A matched MLP's own
    # submodules are not candidates (they are replaced with it).
    found, taken = [], []
    for parts, module in nnx.iter_modules(model):
        if not parts or any(parts[:len(t)] == t for t in taken):
            continue
        path = "/".join(str(p) for p in parts)
        if isinstance(module, MoE) or not is_mlp(module) or not matches(path):
            continue
        found.append((parts, module))
        taken.append(parts)
    for i, (parts, module) in enumerate(found):
        path = "/".join(str(p) for p in parts)
        layer_cfg = cfg(path) if callable(cfg) and not isinstance(cfg, MoEConfig) else cfg
        dense = dict(upcycle(module)) if upcycle is not None else None
        layer_cfg = _sized(layer_cfg, dense)
        layer = MoE(layer_cfg, rngs=rngs, return_aux=return_aux)
        if dense is not None:
            p = upcycled_params(dense, layer_cfg, jax.random.fold_in(key, i), noise, router_std)
            layer.router.w_DE[...] = p["router"]["w_DE"]
            for name, value in p["experts"].items():
                getattr(layer.experts, name)[...] = value
        _set_child(model, parts, layer)
    return ["/".join(str(p) for p in parts) for parts, _ in found]


def _set_child(root, parts: tuple, new) -> None:
    parent = root
    for p in parts[:-1]:
        parent = parent[p] if isinstance(p, int) else getattr(parent, p)
    last = parts[-1]
    if isinstance(last, int):
        parent[last] = new
    else:
        setattr(parent, last, new)


# --------------------------------------------------------------- Linen ----

_ACTIVE = contextvars.ContextVar("jmoe_moefy_active", default=False)


def linen_interceptor(cfg: ConfigFor, mlp: type, where: Where = None,
                      return_aux: bool = False):
    """A `nn.intercept_methods` context that runs each matching `mlp` call as
    a `jmoe.linen.MoE` in the MLP's own scope (its params at the MLP's path:
    `.../mlp/router/w_DE`, `.../mlp/experts/w_up_EDF`). For models that use the
    MLP deep inside a bigger Linen model: wrap their `init`/`apply` in it."""
    matches = _matcher(where)

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, mlp):
            return next_fun(*args, **kwargs)
        path = "/".join(module.scope.path)
        if not matches(path):
            return next_fun(*args, **kwargs)
        layer_cfg = cfg(path) if callable(cfg) and not isinstance(cfg, MoEConfig) else cfg
        # Bound to the MLP's scope (as `apply` binds a top-level module), so
        # the MoE's weights sit where the MLP's would have.
        layer = jmoe_linen.MoE(layer_cfg, return_aux=return_aux, parent=module.scope)
        x, *rest = args
        if rest:
            raise TypeError(f"moefy: {type(module).__name__} at {path} was called with "
                            f"{len(args)} positional arguments; an MoE takes one (x).")
        other = sorted(set(kwargs) - {"deterministic", "train"})
        if other:
            raise TypeError(f"moefy: {type(module).__name__} at {path} was called with "
                            f"{other}; an MoE takes x and deterministic=/train= only.")
        return layer(x, **kwargs)

    return nn.intercept_methods(intercept)


def linen_class(model_cls: type, cfg: ConfigFor, *, mlp: type, where: Where = None,
                return_aux: bool = False) -> type:
    """A subclass of `model_cls` whose `init`, `init_with_output` and `apply`
    run under `linen_interceptor`: same fields, same call, MoE FFNs."""

    def entry(name):
        base = getattr(model_cls, name)

        @nn.nowrap
        def method(self, *args, **kwargs):
            if _ACTIVE.get():
                return base(self, *args, **kwargs)
            token = _ACTIVE.set(True)
            try:
                with linen_interceptor(cfg, mlp, where, return_aux):
                    return base(self, *args, **kwargs)
            finally:
                _ACTIVE.reset(token)

        method.__name__ = name
        return method

    ns = {name: entry(name) for name in ("init", "init_with_output", "apply")}
    ns["__doc__"] = f"{model_cls.__name__} with its {mlp.__name__} layers as jmoe MoE layers."
    return type(f"MoE{model_cls.__name__}", (model_cls,), ns)


def upcycle_params(params: Mapping, cfg: ConfigFor, *, where: Where,
                   dense_weights: Callable[[Mapping], Mapping], key: jax.Array,
                   noise: float = 0.0, router_std: float = 0.0) -> dict:
    """A dense Linen model's `params` with every MLP subtree at a path `where`
    matches replaced by upcycled MoE weights (`upcycled_params`).

    dense_weights: the MLP's param subtree -> {"w_up_DF", "w_down_FD"[, "w_gate_DF"]}.
    The result is the `params` of the model that `moefy` made from the same
    class, `mlp` and `where`.
    """
    matches = _matcher(where)
    count = [0]

    def walk(tree, parts):
        path = "/".join(parts)
        if parts and matches(path):
            dense = dict(dense_weights(tree))
            layer_cfg = cfg(path) if callable(cfg) and not isinstance(cfg, MoEConfig) else cfg
            layer_cfg = _sized(layer_cfg, dense)
            count[0] += 1
            return upcycled_params(dense, layer_cfg, jax.random.fold_in(key, count[0]),
                                   noise, router_std)
        if isinstance(tree, Mapping):
            return {k: walk(v, parts + (k,)) for k, v in tree.items()}
        return tree

    out = walk(nn.unbox(dict(params)), ())
    if not count[0]:
        raise ValueError(f"upcycle_params: where={where!r} matched no path in params; "
                         "paths look like 'layers_0/mlp' (the MLP's module path).")
    return out

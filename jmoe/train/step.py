"""Train state, optimizer, and the pure train / eval steps.

`train_step(state, batch_BT) -> (state, metrics)` is a pure function of
arrays: the model's graph definition and the config are bound in with
`functools.partial` before `jax.jit`, so one compiled step serves the whole
run. The batch holds `seq_len + 1` tokens per row (inputs and targets).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jmoe import routing
from jmoe.model import GPT
from jmoe.model_config import GPTConfig
from jmoe.train import mesh as mesh_lib, rebalance


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: nnx.State  # nnx.Param leaves: what the optimizer trains
    opt_state: optax.OptState
    buffers: nnx.State  # every other variable, e.g. the routers' RouterBias


class ModelFamily(abc.ABC):
    """A model other than the GPT-MoE that the steps can train (the trainer's
    model seam; jmoe.train.hf_model.HFModel). Passed where the GPT's
    `nnx.GraphDef` goes; the params and buffers are its own pytrees."""

    @abc.abstractmethod
    def apply(self, params, buffers, inputs_BT, *, train, rng, placement):
        """-> (float32 logits [B, T, V], MoEAux with a leading [layers] axis, or None)."""

    @abc.abstractmethod
    def update_router_biases(self, params, buffers, aux, rate: float):
        """-> buffers after one aux-loss-free bias update (StepConfig.update_router_bias)."""


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static (hashable) part of the config that the step needs."""

    seed: int
    grad_accum_steps: int
    load_balance_weight: float
    z_loss_weight: float
    update_router_bias: bool
    bias_update_rate: float


def step_config(config) -> StepConfig:
    m = config.model
    return StepConfig(
        seed=int(config.seed), grad_accum_steps=int(config.grad_accum_steps),
        load_balance_weight=float(config.loss.load_balance_weight),
        z_loss_weight=float(config.loss.z_loss_weight),
        update_router_bias=(m.router == "sigmoid_topk" and not m.dense),
        bias_update_rate=float(m.bias_update_rate))


def make_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, cosine decay to `lr * min_lr_ratio`, then flat."""
    steps = total_steps if opt_cfg.schedule_steps < 0 else opt_cfg.schedule_steps
    warmup = min(opt_cfg.warmup_steps, steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt_cfg.lr, warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1), end_value=opt_cfg.lr * opt_cfg.min_lr_ratio)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """`optax.clip_by_global_norm`, except that the caller may pass the norm
    (`tx.update(..., grad_norm=n)`): with experts in slot order the norm of
    the state's gradients counts replicas several times, and the step
    passes the logical one (`jmoe.train.rebalance.logical_sq_norm`). Same
    (empty) state, so checkpoints are unchanged."""

    def update(updates, state, params=None, *, grad_norm=None, **extra):
        del params, extra
        norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
        trigger = jnp.squeeze(norm < max_norm)
        clip = lambda t: jax.lax.select(trigger, t, (t / norm.astype(t.dtype)) * max_norm)
        return jax.tree.map(clip, updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def make_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; no weight decay on vectors (norm scales)."""
    # A stacked leaf (scan_layers) counts by one layer's rank: its norm
    # scales are [R, D], vectors all the same.
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(
        lambda p, x: x.ndim - mesh_lib.is_stacked(mesh_lib.path_str(p)) >= 2, params)
    parts = []
    if opt_cfg.grad_clip > 0:
        parts.append(clip_by_global_norm(opt_cfg.grad_clip))
    parts.append(optax.adamw(make_schedule(opt_cfg, total_steps), b1=opt_cfg.b1, b2=opt_cfg.b2,
                             eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts)


def split_model(model: GPT):
    return nnx.split(model, nnx.Param, ...)


def make_init(gpt_cfg: GPTConfig, tx: optax.GradientTransformation, seed: int) -> Callable:
    """A jittable `() -> TrainState` (under `jax.eval_shape` it costs nothing)."""

    def init() -> TrainState:
        _, params, buffers = split_model(GPT(gpt_cfg, rngs=nnx.Rngs(params=seed)))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), buffers=buffers)

    return init


def graphdef_of(gpt_cfg: GPTConfig, slot_weights: bool = False) -> nnx.GraphDef:
    """The model's graph; `slot_weights`: its MoE layers hold experts in slot
    order (online re-placement, `jmoe.train.rebalance`)."""
    def make():
        model = GPT(gpt_cfg, rngs=nnx.Rngs(params=0))  # the streams make_init uses
        for layer in model.moe_blocks():
            layer.slot_weights = slot_weights
        return split_model(model)
    graphdef, _, _ = jax.eval_shape(make)
    return graphdef


def _forward(graphdef, params, buffers, tokens_BT1, train: bool, rng, scfg: StepConfig,
             placement=None):
    """Loss terms of one (micro-)batch; returns (loss, (metrics, aux))."""
    inputs_BT, targets_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
    if isinstance(graphdef, ModelFamily):
        logits_BTV, aux = graphdef.apply(params, buffers, inputs_BT, train=train, rng=rng,
                                         placement=placement)
    else:
        model = nnx.merge(graphdef, params, buffers)
        logits_BTV, aux = model(inputs_BT, train=train, rng=rng, placement=placement)
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    nll_BT = -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    ce = jnp.mean(nll_BT)
    loss = ce
    metrics = {"ce": ce}
    if aux is not None:
        lb, z = jnp.mean(aux.load_balance_loss), jnp.mean(aux.z_loss)
        loss = loss + scfg.load_balance_weight * lb + scfg.z_loss_weight * z
        metrics.update(load_balance_loss=lb, z_loss=z)
    metrics["loss"] = loss
    return loss, (metrics, aux)


def train_step(state: TrainState, batch_BT1: jax.Array, placement=None, *,
               graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
               schedule: optax.Schedule, scfg: StepConfig,
               block_to_moe: Optional[dict] = None) -> tuple[TrainState, dict]:
    """One optimizer step over `grad_accum_steps` micro-batches.

    `placement` (stacked `PlacementArrays`, with a graphdef whose MoE layers
    hold slot-ordered experts): where the experts run; data, so a new
    placement reuses the compiled step. `block_to_moe`: block -> MoE layer.
    """
    rng = jax.random.fold_in(jax.random.key(scfg.seed), state.step)
    grad_fn = jax.value_and_grad(_forward, argnums=1, has_aux=True)
    a = scfg.grad_accum_steps

    def micro(i, tokens_BT1):
        (_, (m, aux)), g = grad_fn(graphdef, state.params, state.buffers, tokens_BT1, True,
                                   jax.random.fold_in(rng, i), scfg, placement)
        return g, m, aux

    if a == 1:
        grads, metrics, aux = micro(0, batch_BT1)
    else:
        # Row r goes to micro-batch r % a: every device's shard of the batch
        # contributes to every micro-batch, so no device idles in the scan.
        b = batch_BT1.shape[0]
        micro_UBT1 = jnp.swapaxes(batch_BT1.reshape(b // a, a, -1), 0, 1)

        def body(carry, xs):
            i, tokens_BT1 = xs
            g, m, aux = micro(i, tokens_BT1)
            return jax.tree.map(jnp.add, carry, g), (m, aux)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, (metrics, aux) = jax.lax.scan(body, zeros, (jnp.arange(a), micro_UBT1))
        grads = jax.tree.map(lambda g: g / a, grads)
        metrics, aux = jax.tree.map(lambda x: jnp.mean(x, axis=0), (metrics, aux))

    if placement is None:
        grad_norm = optax.tree.norm(grads)
    else:
        grad_norm = jnp.sqrt(rebalance.logical_sq_norm(grads, placement, block_to_moe))
    updates, opt_state = tx.update(grads, state.opt_state, state.params, grad_norm=grad_norm)
    params = optax.apply_updates(state.params, updates)
    buffers = state.buffers
    if aux is not None and scfg.update_router_bias:
        buffers = _update_router_biases(graphdef, params, buffers, aux, scfg.bias_update_rate)

    metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(state.step))
    if aux is not None:
        metrics.update(expert_load=aux.expert_load, dropped_fraction=aux.dropped_fraction,
                       router_entropy=aux.router_entropy, capacity_factor=aux.capacity_factor)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           buffers=buffers)
    return new_state, metrics


def _update_router_biases(graphdef, params, buffers, aux, rate: float) -> nnx.State:
    """Aux-loss-free balancing, outside the optimizer: nudge each MoE layer's
    selection bias toward its under-loaded experts (DeepSeek-V3)."""
    if isinstance(graphdef, ModelFamily):
        return graphdef.update_router_biases(params, buffers, aux, rate)
    model = nnx.merge(graphdef, params, buffers)
    for layer, rows in model.moe_block_rows():
        # A stacked layer (scan_layers) holds [R] biases: one update per row.
        update = routing.update_bias if isinstance(rows, int) else jax.vmap(
            routing.update_bias, in_axes=(0, 0, None))
        layer.router.bias[...] = update(layer.router.bias[...], aux.expert_load[rows], rate)
    _, _, new_buffers = split_model(model)
    return new_buffers


def eval_step(state: TrainState, batch_BT1: jax.Array, placement=None, *,
              graphdef: nnx.GraphDef, scfg: StepConfig) -> jax.Array:
    """Mean next-token cross entropy (nats per token) of one batch."""
    _, (metrics, _) = _forward(graphdef, state.params, state.buffers, batch_BT1, False, None,
                               scfg, placement)
    return metrics["ce"]


def jit_steps(state_sharding, batch_sharding, graphdef, tx, schedule, scfg,
              placement_sharding=None, block_to_moe=None):
    """The jitted train step (state donated) and eval step: `(state, batch)`,
    or `(state, batch, placement)` when `placement_sharding` is given
    (re-placement on, experts in slot order)."""
    ins = (state_sharding, batch_sharding)
    if placement_sharding is not None:
        ins += (placement_sharding,)
    train = jax.jit(
        functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule, scfg=scfg,
                          block_to_moe=block_to_moe),
        in_shardings=ins, out_shardings=(state_sharding, None), donate_argnums=(0,))
    evaluate = jax.jit(functools.partial(eval_step, graphdef=graphdef, scfg=scfg),
                       in_shardings=ins)
    return train, evaluate

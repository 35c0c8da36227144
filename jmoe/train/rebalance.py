"""Online expert re-placement in the trainer (`config.placement`, issue 14).

With `placement.every = N > 0` the trainer keeps every MoE layer's expert
weights -- and their Adam moments -- in the slot order of a
`jmoe.placement.Placement` (`S = E/ep + placement.spare_slots` slots per
device, the spare ones holding replicas of hot experts). Every N steps it
averages the expert loads the steps recorded since the last decision, asks
`jmoe.balance` for a better placement per layer, prices the gain against
the move with the planner (`jmoe.planner.layer_cost.placement_price`), and,
when it pays over the next N steps (or always, with `policy='always'`),
moves the weights and moments to their new slots in one jitted step.

Data flows one way: the placement is host data (this module), handed to the
jitted steps as int32 arrays (`jmoe.placement.stack`), so a new placement
never recompiles. Checkpoints hold the state in logical expert order plus the
placement and the recorded loads (`state_dict`), so a run resumes
bit-identically, and under another mesh or with placement switched off.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jmoe.balance import balance
from jmoe.config import FieldError, from_section
from jmoe.model_config import GPTConfig
from jmoe.placement import Placement, PlacementArrays, move_source, stack
from jmoe.planner import hardware as hw_lib
from jmoe.planner.layer_cost import placement_price
from jmoe.train import mesh as mesh_lib

POLICIES = ("cost_model", "always")

# An expert weight of MoE block i anywhere in the state: the params and every
# optimizer moment that mirrors them (".../mu/blocks/3/ffn/experts/w_up_EDF/value").
_EXPERT_LEAF = re.compile(r"(?:^|/)blocks/(\d+)/ffn/experts/w_\w+(?:/|$)")


@dataclasses.dataclass(frozen=True)
class PlacementConfig:
    """`config.placement`, validated.

      every: re-place every this many steps; 0 = off (static layout, weights
        in logical order).
      spare_slots: redundant slots per device (replicas of hot experts).
      policy: `cost_model` moves when the planner prices the gain over the
        next `every` steps above the move; `always` moves whenever the
        balancer finds a better placement (tests, studies).
      hardware: the planner profile the decision is priced on (`auto`: the
        running GPU's, `h100` where unknown and on CPU).
    """

    every: int = 0
    spare_slots: int = 0
    policy: str = "cost_model"
    hardware: str = "auto"

    @property
    def enabled(self) -> bool:
        return self.every > 0


def _fail(field: str, value, fix: str):
    raise FieldError("config.placement", field, value, fix)


def placement_config(section) -> PlacementConfig:
    """From `config.placement` (absent = off); raises naming the field and fix."""
    pc = from_section(PlacementConfig, section, "config.placement")
    if not isinstance(pc.every, int) or pc.every < 0:
        _fail("every", pc.every, "must be an integer >= 0 (0 = no re-placement).")
    if not isinstance(pc.spare_slots, int) or pc.spare_slots < 0:
        _fail("spare_slots", pc.spare_slots, "must be an integer >= 0.")
    if pc.policy not in POLICIES:
        _fail("policy", pc.policy, f"choose one of {POLICIES}.")
    if pc.hardware != "auto" and hw_lib.ALIASES.get(pc.hardware, pc.hardware) not in hw_lib.PROFILES:
        _fail("hardware", pc.hardware, f"choose 'auto' or one of {tuple(hw_lib.PROFILES)}.")
    if pc.spare_slots and not pc.enabled:
        _fail("spare_slots", pc.spare_slots,
              "replicas need re-placement: set --config.placement.every=N (N > 0).")
    return pc


def check_model(pc: PlacementConfig, gpt: GPTConfig, ep: int) -> None:
    """Raises for a model the placement cannot run (before compiling)."""
    if not pc.enabled:
        return
    if gpt.dense or gpt.moe is None:
        _fail("every", pc.every, "the model has no MoE layers: set placement.every=0.")
    if gpt.scan_layers:
        # Re-placement moves experts per layer (paths blocks/<i>/ffn/experts).
        _fail("every", pc.every, "online re-placement needs per-layer blocks: set "
              "model.scan_layers=false, or placement.every=0.")
    if gpt.moe.router == "expert_choice":
        _fail("every", pc.every, "expert_choice routing fills a fixed capacity per expert "
              "and cannot be placed: use a token-choice router or placement.every=0.")
    if gpt.moe.dispatch == "capacity":
        # A replicated expert holds one capacity per replica, so which rows
        # drop (and so the losses) would change with every move.
        _fail("every", pc.every, "capacity dispatch gives each replica its own capacity, "
              "so a placement changes which tokens drop: use model.dispatch='dropless' "
              "with placement, or placement.every=0.")
    if gpt.moe.num_experts % ep:
        _fail("every", pc.every, f"num_experts={gpt.moe.num_experts} must divide over the "
              f"expert axis ({ep}).")


def planner_profile(name: str):
    """The planner hardware profile `name` (`auto`: the running GPU's, h100 where unknown)."""
    if name != "auto":
        return hw_lib.get(name)
    kind = jax.devices()[0].device_kind.lower()
    for key in ("h200", "h100", "a100", "a800", "a30"):
        if key in kind and key in hw_lib.PROFILES:
            return hw_lib.PROFILES[key]
    return hw_lib.PROFILES["h100"]


def _moe_index(path, block_to_moe: dict) -> Optional[int]:
    """The MoE layer (0..L-1) whose expert weight this state leaf is, or None."""
    m = _EXPERT_LEAF.search(mesh_lib.path_str(path))
    return None if m is None else block_to_moe[int(m.group(1))]


def reindex_experts(tree: Any, index_LN: jax.Array, block_to_moe: dict) -> Any:
    """Every expert leaf `x` of MoE layer l (params, gradients, optimizer
    moments) becomes `x[index_LN[l]]` along its first (expert / slot) axis;
    other leaves are untouched. One function for every change of layout:
    logical -> slots (index = slot's expert), slots -> logical (expert's first
    replica) and a move (`jmoe.placement.move_source`)."""
    def one(path, x):
        j = _moe_index(path, block_to_moe)
        return x if j is None else jnp.take(x, index_LN[j], axis=0)
    return jax.tree_util.tree_map_with_path(one, tree)


def logical_sq_norm(grads: Any, placement: PlacementArrays, block_to_moe: dict) -> jax.Array:
    """Sum of squares of the gradients as if the experts were in logical
    order: a slot's square counts 1/r for an expert with r replicas (they
    all hold its full gradient), so clipping and the logged norm equal the
    static layout's."""
    reps_LE = placement.num_replicas_E
    slot_LS = placement.slot_expert_PS.reshape(reps_LE.shape[0], -1)

    def one(path, g):
        g = g.astype(jnp.float32)
        j = _moe_index(path, block_to_moe)
        if j is None:
            return jnp.sum(g * g)
        w_S = 1.0 / reps_LE[j][slot_LS[j]].astype(jnp.float32)
        return jnp.sum(jnp.sum(g * g, axis=tuple(range(1, g.ndim))) * w_S)

    return sum(jax.tree.leaves(jax.tree_util.tree_map_with_path(one, grads)))


@dataclasses.dataclass
class Decision:
    """One re-placement decision (logged; `moved` says whether it ran)."""

    step: int
    busiest_before: list  # [L] busiest device / mean under the current placement
    busiest_after: list  # [L] under the proposed one
    busiest_static: list  # [L] under the static layout (for reference)
    predicted_gain_s: float  # over the next `every` steps, minus replicas' syncs
    predicted_move_s: float
    moved: bool
    move_s: float = float("nan")  # measured, when moved

    def message(self, every: int) -> str:
        mean = lambda v: float(np.mean(v))
        head = (f"placement at step {self.step}: busiest device / mean "
                f"{mean(self.busiest_before):.2f} -> {mean(self.busiest_after):.2f} "
                f"(static {mean(self.busiest_static):.2f}, mean over layers); predicted "
                f"gain {self.predicted_gain_s * 1e3:.2f} ms over {every} steps vs move "
                f"{self.predicted_move_s * 1e3:.2f} ms")
        if self.moved:
            return head + f": moved experts and Adam moments in {self.move_s * 1e3:.0f} ms"
        return head + ": kept the current placement"


class Rebalancer:
    """Host-side state of online re-placement: the current placement of each
    MoE layer and the expert loads recorded since the last decision."""

    def __init__(self, pc: PlacementConfig, gpt: GPTConfig, ep: int, tokens_per_device: int):
        self.pc, self.gpt, self.ep = pc, gpt, ep
        self.tokens = tokens_per_device
        e = gpt.moe.num_experts
        self.num_experts = e
        self.slots = e // ep + pc.spare_slots
        self.node_size = max(gpt.moe.execution.a2a_hierarchy, 0)
        self.block_to_moe = {b: j for j, b in enumerate(gpt.moe_layers)}
        num_layers = len(gpt.moe_layers)
        start = (Placement.static(e, ep) if pc.spare_slots == 0 else
                 balance(np.ones(e), ep, self.slots, node_size=self.node_size))
        self.placements = [start] * num_layers
        self.load_sum_LE = np.zeros((num_layers, e))
        self.load_steps = 0
        self.static = Placement.static(e, ep)
        self.hw = planner_profile(pc.hardware)

    # -- data for the jitted steps -------------------------------------------

    def arrays(self) -> PlacementArrays:
        return stack(self.placements)

    def slot_index(self) -> jax.Array:
        """int32 [L, P*S]: each slot's expert (logical -> slots)."""
        return jnp.asarray(np.stack([p.slot_expert_PS.reshape(-1) for p in self.placements]))

    def logical_index(self) -> jax.Array:
        """int32 [L, E]: each expert's first slot (slots -> logical)."""
        return jnp.asarray(np.stack([[p.replicas(e)[0] for e in range(self.num_experts)]
                                     for p in self.placements]), jnp.int32)

    # -- recorded loads -------------------------------------------------------

    def observe(self, expert_load_LE) -> dict:
        """Records one step's loads; returns its device-load metrics: [L]
        busiest device / mean under the current placement and the static one,
        and [L, P] each device's share of the rows (`device_load`)."""
        load = np.asarray(expert_load_LE, np.float64)
        self.load_sum_LE += load
        self.load_steps += 1
        return {"busiest_device": np.array([p.imbalance(l) for p, l in
                                            zip(self.placements, load)]),
                "busiest_device_static": np.array([self.static.imbalance(l) for l in load]),
                "device_load": self.device_loads(load)}

    def device_loads(self, expert_load_LE) -> np.ndarray:
        """float [L, P] each device's share of the rows under the current placement."""
        return np.stack([p.device_loads(l) for p, l in
                         zip(self.placements, np.asarray(expert_load_LE, np.float64))])

    # -- decisions ---------------------------------------------------------------

    def decide(self, step: int) -> Optional[tuple[Decision, list]]:
        """At a decision step: (decision, proposed placements), or None when
        no loads were recorded since the last one. Resets the recorded loads."""
        if self.load_steps == 0:
            return None
        load_LE = self.load_sum_LE / self.load_steps
        self.load_sum_LE[:] = 0.0
        self.load_steps = 0
        proposed = [balance(l, self.ep, self.slots, node_size=self.node_size) for l in load_LE]
        before = [p.imbalance(l) for p, l in zip(self.placements, load_LE)]
        after = [p.imbalance(l) for p, l in zip(proposed, load_LE)]
        static = [self.static.imbalance(l) for l in load_LE]
        gain = move = 0.0
        changed = False
        for cur, new, b, a in zip(self.placements, proposed, before, after):
            moved = int(np.sum(cur.slot_expert_PS != new.slot_expert_PS))
            changed |= moved > 0 or cur != new
            price = placement_price(
                self.gpt.moe, self.tokens, self.ep, self.hw, busiest_before=b,
                busiest_after=a, redundant=new.num_redundant, moved_slots=moved,
                param_dtype=self.gpt.param_dtype)
            gain += self.pc.every * (price.step_gain - price.replica_sync)
            move += price.move
        better = sum(after) < sum(before) - 1e-9
        if self.pc.policy == "always":
            do = changed and better
        else:
            do = changed and better and gain > move
        return Decision(step, before, after, static, gain, move, do), proposed

    def adopt(self, proposed: list) -> np.ndarray:
        """Makes `proposed` current; returns int32 [L, P*S] move sources."""
        src = np.stack([move_source(old, new) for old, new in zip(self.placements, proposed)])
        self.placements = list(proposed)
        return src

    # -- checkpoints ---------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"ep": self.ep, "slots": self.slots,
                "layers": [{"slot_expert": p.slot_expert_PS.tolist(),
                            "share": p.share_PS.tolist()} for p in self.placements],
                "load_sum": self.load_sum_LE.tolist(), "load_steps": self.load_steps}

    def load_state_dict(self, d: Optional[dict]) -> str:
        """Restores a saved placement and recorded loads when they fit this
        run (same ep, slots and layers); returns what happened, for the log."""
        if not d or "layers" not in d:
            return "no saved placement: starting from the initial one"
        if (d["ep"], d["slots"], len(d["layers"])) != (self.ep, self.slots,
                                                        len(self.placements)):
            return (f"saved placement is for ep={d['ep']}, {d['slots']} slots per device; "
                    f"this run has ep={self.ep}, {self.slots}: starting from the initial one")
        self.placements = [Placement(self.num_experts, np.array(x["slot_expert"]),
                                     np.array(x["share"])) for x in d["layers"]]
        self.load_sum_LE = np.array(d["load_sum"], np.float64)
        self.load_steps = int(d["load_steps"])
        return "restored the saved placement"


def timed(fn, *args):
    """(result, seconds) of a jitted call, waiting for the result."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


class OnlinePlacement:
    """What the training loop holds when `config.placement.every > 0`: the
    `Rebalancer`, the slot-ordered state's shardings, and the compiled
    layout changes (to slots, to logical order, a move). The loop runs the
    model with `jmoe.train.step.graphdef_of(gpt, slot_weights=True)`."""

    def __init__(self, pc: PlacementConfig, gpt: GPTConfig, mesh, abstract, *, fsdp: bool,
                 tokens_per_device: int, logical_shardings):
        self.pc = pc
        self.rb = Rebalancer(pc, gpt, mesh.shape["expert"], tokens_per_device)
        reindex = functools.partial(reindex_experts, block_to_moe=self.rb.block_to_moe)
        self.abstract = jax.eval_shape(reindex, abstract, self.rb.slot_index())
        self.shardings = mesh_lib.state_shardings(mesh, self.abstract, fsdp=fsdp)
        self.replicated = NamedSharding(mesh, P())
        self._to_slots = jax.jit(reindex, out_shardings=self.shardings)
        self._to_logical = jax.jit(reindex, out_shardings=logical_shardings)
        # Compiled now, so a move's measured time is the move, not its compile.
        src = jax.ShapeDtypeStruct(self.rb.slot_index().shape, jnp.int32)
        with_shardings = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.abstract, self.shardings)
        self._move = jax.jit(reindex, in_shardings=(self.shardings, self.replicated),
                             out_shardings=self.shardings, donate_argnums=(0,)
                             ).lower(with_shardings, src).compile()
        self._arrays = None

    @property
    def block_to_moe(self) -> dict:
        return self.rb.block_to_moe

    def arrays(self) -> PlacementArrays:
        """The current placement for the jitted steps (replicated on the mesh)."""
        if self._arrays is None:
            self._arrays = jax.device_put(self.rb.arrays(), self.replicated)
        return self._arrays

    def enter(self, state: Any, saved: Optional[dict]) -> tuple[Any, str]:
        """Logical-order state (fresh or restored) -> slot order, under the
        saved placement when it fits; returns (state, what happened)."""
        what = self.rb.load_state_dict(saved) if saved is not None else "initial placement"
        self._arrays = None
        return self._to_slots(state, self.rb.slot_index()), what

    def for_checkpoint(self, state: Any) -> Any:
        """The state in logical expert order (checkpoints hold that)."""
        return self._to_logical(state, self.rb.logical_index())

    def observe(self, metrics: dict) -> dict:
        """Adds the step's device-load metrics (host arrays)."""
        return dict(metrics, **self.rb.observe(metrics["expert_load"]))

    def maybe_move(self, state: Any, step: int) -> tuple[Any, Optional[Decision]]:
        """At a multiple of `every` (all steps so far drained): decides, and
        moves weights and moments when the decision says so."""
        if step % self.pc.every:
            return state, None
        out = self.rb.decide(step)
        if out is None:
            return state, None
        decision, proposed = out
        if decision.moved:
            src = self.rb.adopt(proposed)
            self._arrays = None
            state, decision.move_s = timed(self._move, state, jnp.asarray(src))
        return state, decision

    def state_dict(self) -> dict:
        return self.rb.state_dict()

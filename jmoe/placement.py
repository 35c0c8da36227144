"""Where experts live: placements with redundant replicas, and the load balancer (pure).

A `Placement` says, for ONE MoE layer on `P` expert-parallel devices with `S`
physical expert slots each, which logical expert every slot holds and how a
replicated expert's rows are split among its replicas. `P * S >= E`; the
`P * S - E` extra slots hold redundant replicas (DeepSeek-V3's EPLB).

Slots are numbered flat, device-major: slot `p * S + s` is slot `s` of device
`p`. An expert has at most `Y = P * S - E + 1` replicas (the alphabet is in
`jmoe/__init__.py`).

The split rule (deterministic, exact in integers, the same on host and device):
each slot holds a share of its expert's rows in units of 1/SHARE_UNITS; an
expert's shares sum to SHARE_UNITS. Its replicas are its slots in flat order,
and with cumulative shares `c_0 = 0 <= c_1 <= ... <= c_r = SHARE_UNITS`, an
expert with `n` rows (on one source shard) gives replica `y` the rows of rank
`floor(n*c_y/U) <= rank < floor(n*c_{y+1}/U)` (U = SHARE_UNITS). `jmoe.balance`
sets the shares to the split of the *estimated* loads that makes device loads
most even, so a replica's share is what the packing gave it.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SHARE_UNITS = 1 << 15  # shares are exact integers; n*c/U never overflows int32 (see _cut)


class PlacementArrays(NamedTuple):
    """A placement as data for a jitted step: shapes depend only on E, P, S.

      slot_expert_PS: int32 [P, S] logical expert held by each slot.
      replica_slot_EY: int32 [E, Y] flat slot ids (p*S + s) of each expert's
        replicas in flat order, padded with its last replica.
      replica_cut_EY: int32 [E, Y] cumulative share after each replica, in
        units of 1/SHARE_UNITS (padding: SHARE_UNITS, so padding gets no rows).
      num_replicas_E: int32 [E].
    """

    slot_expert_PS: jax.Array
    replica_slot_EY: jax.Array
    replica_cut_EY: jax.Array
    num_replicas_E: jax.Array


def _frozen_int32(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise ValueError(f"Placement.{name} has dtype {a.dtype}: must be an integer array.")
    a = a.astype(np.int32, copy=True)
    a.flags.writeable = False
    return a


@dataclasses.dataclass(frozen=True, eq=False)
class Placement:
    """Where the experts of one MoE layer live (see the module docstring).

      num_experts: E, logical experts.
      slot_expert_PS: int32 [P, S] logical expert held by each slot.
      share_PS: int32 [P, S] the slot's share of its expert's rows, in units
        of 1/SHARE_UNITS; each expert's shares sum to SHARE_UNITS. None =
        equal shares (remainder units to the first replicas).
    """

    num_experts: int
    slot_expert_PS: np.ndarray
    share_PS: np.ndarray | None = None

    def __post_init__(self):
        slots = _frozen_int32(self.slot_expert_PS, "slot_expert_PS")
        object.__setattr__(self, "slot_expert_PS", slots)
        if self.share_PS is None:
            object.__setattr__(self, "share_PS", _frozen_int32(_equal_shares(slots), "share_PS"))
        else:
            object.__setattr__(self, "share_PS", _frozen_int32(self.share_PS, "share_PS"))
        self.validate()

    # -- construction -----------------------------------------------------

    @classmethod
    def static(cls, num_experts: int, ep: int) -> "Placement":
        """Today's layout: expert e on device e // (E/ep), one slot each, no replicas."""
        if not isinstance(ep, int) or ep < 1 or num_experts % ep:
            raise ValueError(f"ep={ep!r} is invalid for the static placement: it must be a "
                             f"positive divisor of num_experts={num_experts}.")
        return cls(num_experts, np.arange(num_experts).reshape(ep, num_experts // ep))


    # -- identity ---------------------------------------------------------

    def __eq__(self, other):
        if not isinstance(other, Placement):
            return NotImplemented
        return (self.num_experts == other.num_experts
                and np.array_equal(self.slot_expert_PS, other.slot_expert_PS)
                and np.array_equal(self.share_PS, other.share_PS))

    def __hash__(self):
        return hash((self.num_experts, self.slot_expert_PS.shape,
                     self.slot_expert_PS.tobytes(), self.share_PS.tobytes()))

    def __repr__(self):
        return (f"Placement(num_experts={self.num_experts}, "
                f"slot_expert_PS={self.slot_expert_PS.tolist()}, "
                f"share_PS={self.share_PS.tolist()})")

    # -- shape ------------------------------------------------------------

    @property
    def ep(self) -> int:
        return self.slot_expert_PS.shape[0]

    @property
    def slots_per_device(self) -> int:
        return self.slot_expert_PS.shape[1]

    @property
    def num_slots(self) -> int:
        return self.slot_expert_PS.size

    @property
    def num_redundant(self) -> int:
        """R: slots beyond one per expert."""
        return self.num_slots - self.num_experts

    @property
    def max_replicas(self) -> int:
        """Y: the most replicas any expert can have, R + 1 (a static shape)."""
        return self.num_redundant + 1

    def replicas(self, expert: int) -> tuple:
        """Flat slot ids (p*S + s) holding `expert`, in flat order."""
        return tuple(int(i) for i in np.flatnonzero(self.slot_expert_PS.reshape(-1) == expert))

    @property
    def num_replicas_E(self) -> np.ndarray:
        return np.bincount(self.slot_expert_PS.reshape(-1), minlength=self.num_experts)

    # -- checks -----------------------------------------------------------

    def validate(self) -> None:
        """Raises ValueError naming what is broken."""
        e_count, slots, share = self.num_experts, self.slot_expert_PS, self.share_PS
        if not isinstance(e_count, (int, np.integer)) or e_count < 1:
            raise ValueError(f"Placement.num_experts={e_count!r} is invalid: must be a "
                             "positive integer.")
        if slots.ndim != 2 or slots.size == 0:
            raise ValueError(f"Placement.slot_expert_PS has shape {slots.shape}: must be a "
                             "non-empty [ep, slots_per_device] array.")
        if slots.size < e_count:
            raise ValueError(f"Placement has {slots.size} slots ({slots.shape[0]} devices x "
                             f"{slots.shape[1]}) for {e_count} experts: it needs "
                             "ep * slots_per_device >= num_experts.")
        bad = np.argwhere((slots < 0) | (slots >= e_count))
        if bad.size:
            p, s = bad[0]
            raise ValueError(f"Placement.slot_expert_PS[{p}, {s}]={slots[p, s]} is out of range: "
                             f"expert ids are 0..{e_count - 1}.")
        missing = np.flatnonzero(np.bincount(slots.reshape(-1), minlength=e_count) == 0)
        if missing.size:
            raise ValueError(f"Placement leaves experts {missing.tolist()} without a slot: "
                             "every expert needs at least one.")
        if share.shape != slots.shape:
            raise ValueError(f"Placement.share_PS has shape {share.shape}: must match "
                             f"slot_expert_PS {slots.shape}.")
        neg = np.argwhere(share < 0)
        if neg.size:
            p, s = neg[0]
            raise ValueError(f"Placement.share_PS[{p}, {s}]={share[p, s]} is negative: "
                             "shares are >= 0.")
        total_E = np.bincount(slots.reshape(-1), weights=share.reshape(-1), minlength=e_count)
        wrong = np.flatnonzero(total_E != SHARE_UNITS)
        if wrong.size:
            e = int(wrong[0])
            raise ValueError(f"Placement: the shares of expert {e} sum to {int(total_E[e])}: "
                             f"each expert's shares must sum to SHARE_UNITS={SHARE_UNITS}.")

    # -- data for jitted code ---------------------------------------------

    def as_arrays(self) -> PlacementArrays:
        """The placement as int32 jax arrays of fixed shapes ([P, S], [E, Y],
        [E, Y], [E] with Y = P*S - E + 1): pass them to a jitted step as
        arguments and a new placement never recompiles it."""
        e_count, y = self.num_experts, self.max_replicas
        flat_e = self.slot_expert_PS.reshape(-1)
        flat_share = self.share_PS.reshape(-1)
        slot_EY = np.zeros((e_count, y), np.int32)
        cut_EY = np.full((e_count, y), SHARE_UNITS, np.int32)
        for e in range(e_count):
            ids = np.flatnonzero(flat_e == e)
            slot_EY[e, :len(ids)] = ids
            slot_EY[e, len(ids):] = ids[-1]
            cut_EY[e, :len(ids)] = np.cumsum(flat_share[ids])
        return PlacementArrays(jnp.asarray(self.slot_expert_PS), jnp.asarray(slot_EY),
                               jnp.asarray(cut_EY), jnp.asarray(self.num_replicas_E, jnp.int32))

    # -- loads ------------------------------------------------------------

    def fraction_PS(self) -> np.ndarray:
        """float64 [P, S] each slot's fraction of its expert's rows."""
        return self.share_PS / SHARE_UNITS

    def device_loads(self, load_E) -> np.ndarray:
        """float64 [P] rows each device computes when expert e has `load_E[e]`
        rows, split among its replicas by the shares."""
        load = check_load(load_E, self.num_experts)
        return (load[self.slot_expert_PS] * self.fraction_PS()).sum(axis=1)

    def imbalance(self, load_E) -> float:
        """Busiest device / mean device (1.0 = perfectly even; 1.0 for no load)."""
        d = self.device_loads(load_E)
        mean = d.sum() / d.size
        return float(d.max() / mean) if mean > 0 else 1.0


def _equal_shares(slots: np.ndarray) -> np.ndarray:
    """Equal shares of each expert among its slots; remainder units to the first."""
    flat = slots.reshape(-1)
    share = np.zeros(flat.shape, np.int64)
    for e in np.unique(flat):
        if e < 0:
            continue
        ids = np.flatnonzero(flat == e)
        q, r = divmod(SHARE_UNITS, len(ids))
        share[ids] = q
        share[ids[:r]] += 1
    return share.reshape(slots.shape)


def check_load(load_E, num_experts: int) -> np.ndarray:
    load = np.asarray(load_E, np.float64)
    if load.shape != (num_experts,):
        raise ValueError(f"load_E has shape {load.shape}: must be [{num_experts}] "
                         "(one load per expert).")
    if not np.all(np.isfinite(load)) or np.any(load < 0):
        raise ValueError(f"load_E={load.tolist()} is invalid: loads must be finite and >= 0.")
    return load


def normalized(load: np.ndarray) -> np.ndarray:
    """Loads scaled to a largest of 1: placements do not depend on the unit,
    and the search's sums of squares stay finite."""
    top = float(load.max(initial=0.0))
    return load / top if top > 0 else load


def stack(placements) -> PlacementArrays:
    """The arrays of several layers' placements (same E, P, S), stacked:
    [L, ...] leaves, as `jmoe.model.GPT` takes them (one per MoE layer)."""
    arrays = [p.as_arrays() for p in placements]
    return jax.tree.map(lambda *a: jnp.stack(a), *arrays)


# -- weights in slot order ---------------------------------------------------


def _slot_expert_S(placement) -> jax.Array:
    return jnp.asarray(placement.slot_expert_PS).reshape(-1)


def _first_slot_E(placement) -> jax.Array:
    if isinstance(placement, Placement):
        placement = placement.as_arrays()
    return placement.replica_slot_EY[:, 0]


def to_slots(w: dict, placement) -> dict:
    """Expert weights in logical order ({name: [E, ...]}) -> the placement's
    slot order ({name: [P*S, ...]}), each replica a copy of its expert.
    `placement`: a `Placement` or its `PlacementArrays` (jittable)."""
    idx_S = _slot_expert_S(placement)
    return {k: jnp.take(v, idx_S, axis=0) for k, v in w.items()}


def to_logical(w: dict, placement) -> dict:
    """Slot-ordered weights ({name: [P*S, ...]}) -> logical order ([E, ...]):
    each expert from its first replica (all replicas are equal)."""
    idx_E = _first_slot_E(placement)
    return {k: jnp.take(v, idx_E, axis=0) for k, v in w.items()}


def move_source(old: "Placement", new: "Placement") -> np.ndarray:
    """int32 [P*S_new]: for each slot of `new`, the slot of `old` to copy it
    from (its expert's first replica under `old`). `x_new = x_old[src]`
    moves slot-ordered weights, or anything laid out like them (optimizer
    moments), from one placement to the other."""
    if old.num_experts != new.num_experts:
        raise ValueError(f"placements for {old.num_experts} and {new.num_experts} experts: "
                         "a move needs the same experts.")
    first_E = np.array([old.replicas(e)[0] for e in range(old.num_experts)], np.int32)
    return first_E[new.slot_expert_PS.reshape(-1)]


# -- jittable helpers (read PlacementArrays as data) ------------------------


def _cut(n, cut):
    """floor(n * cut / SHARE_UNITS) in int32 without overflow: n = a*U + b
    gives a*cut + floor(b*cut/U), and b*cut < U*U = 2**30."""
    n = n.astype(jnp.int32)
    a, b = n // SHARE_UNITS, n % SHARE_UNITS
    return a * cut + (b * cut) // SHARE_UNITS


def replica_rows(arrays: PlacementArrays, count_E: jax.Array) -> jax.Array:
    """int32 [E, Y] rows each replica takes when expert e has `count_E[e]` rows."""
    ends = _cut(count_E[:, None], arrays.replica_cut_EY)
    starts = jnp.concatenate([jnp.zeros_like(ends[:, :1]), ends[:, :-1]], axis=1)
    return ends - starts


def slot_rows(arrays: PlacementArrays, count_E: jax.Array) -> jax.Array:
    """int32 [P, S] rows each slot takes when expert e has `count_E[e]` rows."""
    rows = replica_rows(arrays, count_E).reshape(-1)
    num_slots = arrays.slot_expert_PS.size
    out = jnp.zeros((num_slots,), jnp.int32).at[arrays.replica_slot_EY.reshape(-1)].add(rows)
    return out.reshape(arrays.slot_expert_PS.shape)


def replica_slot(arrays: PlacementArrays, expert_A: jax.Array, rank_A: jax.Array,
                 count_E: jax.Array) -> jax.Array:
    """int32 [A] flat slot of each row: row `rank_A` (0-based, among the
    `count_E[e]` rows of its expert e = `expert_A`) goes to the replica whose
    range of ranks holds it (module docstring)."""
    ends_AY = _cut(count_E[expert_A][:, None], arrays.replica_cut_EY[expert_A])
    y = jnp.sum(ends_AY <= rank_A[:, None], axis=1)
    y = jnp.minimum(y, arrays.replica_cut_EY.shape[1] - 1)
    return jnp.take_along_axis(arrays.replica_slot_EY[expert_A], y[:, None], axis=1)[:, 0]

"""Choosing a placement: the load balancer (NumPy, host side).

`balance` (the method). The split makes the slot layout the only hard part:
  1. replica counts, EPLB's greedy: every expert starts with one slot; each
     redundant slot goes to the expert with the largest load per replica
     (ties: lower expert index);
  2. packing, heaviest replica first (load / replicas; ties: lower expert
     index) onto the least-loaded device with a free slot, preferring one that
     does not hold that expert yet (ties: lower device index);
  3. the split: for the slots chosen, the split of each expert's load among
     its devices that makes device loads lexicographically most even (the
     busiest as light as possible, then the next, ...), so no split of these
     slots has a lighter busiest device. Exact, by max-flow (`jmoe.even_split`);
  4. local search: swap a slot of a busiest device with one of a lighter
     device while that lowers (busiest, sum of squared loads): first swaps
     that gain with the shares kept, then a re-split, then (a bounded number
     of) swaps judged by re-splitting. Every step lowers the key, so it ends;
  5. candidates: 2. as above; the static layout (expert e on device
     e // (E/P), when P divides E) with the redundant slots filled by 2.;
     and a fill: experts heaviest first, each onto the device it fits best
     under a level, split across devices where it fits nowhere, the level
     bisected between the mean and the best busiest so far. Each goes through
     3.-4.; the lightest busiest wins (ties, within 1e-4 of the mean device:
     fewer experts spanning nodes, then the earlier candidate, so static: it
     moves fewer weights). Extra replicas never hurt under the optimal split,
     so `balance` is never worse than the static layout (flat: at all;
     hierarchical: by more than that tie margin).
On 100,000 random small cases (E <= 6, P <= 4, S <= 3) the busiest device is
within 0.1% of the brute-force optimum in 99.5% of them and at most 1.115x it;
on E=16..256 over 8..64 devices with one or two spare slots per device the
busiest device is mostly within 0.02% of the mean (worst seen: 2%, an expert
at 20x the mean on 64 devices with 2 slots), in at most ~0.15 s.

Hierarchical (`node_size` > 1: nodes of `node_size` consecutive devices, as
`Execution.a2a_hierarchy`): an expert's replicas should share a node, so
their gradient reduction and any move of their weights stay on the fast
intra-node links; they leave it only when balance needs them to. Step 2
becomes two levels:
  2a. across nodes: each expert's replicas are a bundle (weight = its load,
      size = its replicas), packed heaviest first onto the least-loaded node
      with room for the whole bundle. A bundle is split across nodes only when
      no node has room for it, or when it would push the node past its fair
      share (total / nodes): when one node cannot carry it;
  2b. within each node, its replicas are packed onto its devices as in 2.
The split (3.) is global; the local search (4.) of this candidate (and of the
static one, whose replicas go to their expert's node first) swaps only within
a node. The flat candidates of 5. stay in the running: when locality costs
balance they win, otherwise the tie rule picks the candidate with fewer
experts spanning nodes.
"""

from __future__ import annotations

import heapq
import math
from typing import Sequence

import numpy as np

from jmoe.even_split import balanced_split, flatten_slot_peak, shares_from_slot_loads
from jmoe.placement import Placement, check_load, normalized

_EPS = 1e-9  # a move must gain this x mean to count
_GOOD = 1e-4  # busiest within this of the mean ends the search (shares are 1/32768 units)
_BISECT = 12  # bisection steps of the fill candidate's level
_EXACT_TRIES = 32  # swaps a local search may judge by re-splitting, in all (the costly part)


def _replica_counts(load: np.ndarray, num_slots: int) -> np.ndarray:
    """EPLB's greedy: each redundant slot to the largest load per replica."""
    e_count = load.shape[0]
    r = np.ones(e_count, np.int64)
    heap = [(-float(load[e]), e) for e in range(e_count)]
    heapq.heapify(heap)
    for _ in range(num_slots - e_count):
        _, e = heapq.heappop(heap)
        r[e] += 1
        heapq.heappush(heap, (-float(load[e]) / r[e], e))
    return r


def _pack_units(units, devices: Sequence[int], free: list, dev_load: list, dev_holds: list,
                slots: list, slots_per_device: int) -> None:
    """Heaviest unit first onto the least-loaded device with a free slot,
    preferring one not holding that expert (ties: lower index). `units` is a
    list of (weight, expert), already in packing order; fills `slots`."""
    for w, e in units:
        open_ = [p for p in devices if free[p]]
        fresh = [p for p in open_ if e not in dev_holds[p]]
        p = min(fresh or open_, key=lambda q: (dev_load[q], q))
        slots[p * slots_per_device + slots_per_device - free[p]] = e
        free[p] -= 1
        dev_load[p] += w
        dev_holds[p].add(e)


def _unit_order(load: np.ndarray, r: np.ndarray, counts=None):
    """(weight, expert) units, heaviest first, ties by expert index."""
    counts = r if counts is None else counts
    es = sorted((e for e in range(load.shape[0]) if counts[e]), key=lambda e: (-load[e] / r[e], e))
    return [(load[e] / r[e], e) for e in es for _ in range(counts[e])]


def _pack_nodes(load: np.ndarray, r: np.ndarray, num_nodes: int, node_slots: int) -> np.ndarray:
    """Step 2a: units of each expert on each node, int [nodes, E]."""
    e_count = load.shape[0]
    out = np.zeros((num_nodes, e_count), np.int64)
    free = [node_slots] * num_nodes
    node_load = [0.0] * num_nodes
    target = load.sum() / num_nodes
    for e in sorted(range(e_count), key=lambda e: (-load[e], e)):
        rem, w = int(r[e]), load[e] / r[e]
        while rem:
            fits = [n for n in range(num_nodes) if free[n] >= rem]
            if fits:
                n = min(fits, key=lambda m: (node_load[m], m))
                k = rem
                if rem > 1 and w > 0 and node_load[n] + w * rem > target * (1 + _EPS):
                    # One node cannot carry it all: fill this node to its fair share.
                    k = min(rem - 1, max(1, math.ceil((target - node_load[n]) / w - _EPS)))
            else:
                n = min((m for m in range(num_nodes) if free[m]), key=lambda m: (node_load[m], m))
                k = min(free[n], rem)
            out[n, e] += k
            free[n] -= k
            node_load[n] += w * k
            rem -= k
    return out


def _greedy_slots(load, r, ep, spd, node_size, start=None) -> np.ndarray:
    """Steps 2 (flat) or 2a-2b (hierarchical): flat slot -> expert, int [P*S].

    `start` pre-fills slots (-1 = free) whose experts count against `r`."""
    num_nodes = ep // node_size
    slots = [-1] * (ep * spd) if start is None else list(start)
    free = [sum(1 for s in range(spd) if slots[p * spd + s] < 0) for p in range(ep)]
    dev_holds = [{e for e in slots[p * spd:(p + 1) * spd] if e >= 0} for p in range(ep)]
    dev_load = [sum(load[e] / r[e] for e in slots[p * spd:(p + 1) * spd] if e >= 0)
                for p in range(ep)]
    placed = np.bincount([e for e in slots if e >= 0], minlength=load.shape[0])
    todo = r - placed
    if start is None and num_nodes > 1:
        per_node = _pack_nodes(load, r, num_nodes, node_size * spd)
    else:
        # Pre-filled slots (the static candidate) already fix the home nodes;
        # a replica then goes where `_pack_units` finds room, its home first.
        per_node = None
    if per_node is None:
        if num_nodes > 1:
            home = {}
            for i, e in enumerate(slots):
                if e >= 0:
                    home.setdefault(e, (i // spd) // node_size)
            for w, e in _unit_order(load, r, todo):
                n = home[e]
                devs = [p for p in range(n * node_size, (n + 1) * node_size) if free[p]]
                _pack_units([(w, e)], devs or range(ep), free, dev_load, dev_holds, slots, spd)
        else:
            _pack_units(_unit_order(load, r, todo), range(ep), free, dev_load, dev_holds, slots,
                        spd)
    else:
        for n in range(num_nodes):
            devs = range(n * node_size, (n + 1) * node_size)
            _pack_units(_unit_order(load, r, per_node[n]), devs, free, dev_load, dev_holds,
                        slots, spd)
    return np.asarray(slots, np.int64)


def _fill_slots(load: np.ndarray, ep: int, spd: int, level: float):
    """Step 2' (another candidate): experts heaviest first, each onto the device
    it fits best (least room left, at most `level`); one that fits nowhere is
    split, filling the roomiest device up to `level`, the rest placed likewise.
    Slots left over get replicas of the heaviest experts per replica. Returns
    flat slot -> expert, or None when the slots run out."""
    e_count = load.shape[0]
    room, free = [level] * ep, [spd] * ep
    held = [set() for _ in range(ep)]
    slots = [[] for _ in range(ep)]
    tol = _EPS * max(level, 1e-300)
    left = sum(free)
    for n, e in enumerate(sorted(range(e_count), key=lambda e: (-load[e], e))):
        later, rest = e_count - n - 1, float(load[e])
        while True:
            fit = [p for p in range(ep) if free[p] and e not in held[p] and room[p] >= rest - tol]
            if fit:
                p = min(fit, key=lambda q: (room[q], q))
                take = rest
            else:
                open_ = [p for p in range(ep) if free[p] and e not in held[p] and room[p] > tol]
                if not open_ or left < later + 2:
                    return None
                p = min(open_, key=lambda q: (-room[q], q))
                take = room[p]
            slots[p].append(e)
            held[p].add(e)
            free[p] -= 1
            left -= 1
            room[p] -= take
            rest -= take
            if rest <= tol:
                break
    r = np.bincount([e for s in slots for e in s], minlength=e_count)
    for p in range(ep):
        while free[p]:
            e = min((e for e in range(e_count) if e not in held[p]), default=None,
                    key=lambda e: (-load[e] / r[e], e))
            e = slots[p][0] if e is None else e
            slots[p].append(e)
            held[p].add(e)
            r[e] += 1
            free[p] -= 1
    return np.asarray([e for s in slots for e in s], np.int64)


def _fill_candidate(load: np.ndarray, ep: int, spd: int, high: float):
    """`_fill_slots` at the lowest level it manages, by bisection between the
    mean device load and `high` (a busiest load already reached)."""
    low = float(load.sum()) / ep
    best = _fill_slots(load, ep, spd, high)
    for _ in range(_BISECT):
        if high - low <= _GOOD * low:
            break
        mid = (low + high) / 2
        got = _fill_slots(load, ep, spd, mid)
        if got is None:
            low = mid
        else:
            best, high = got, mid
    return best


def _key(x: np.ndarray, ep: int, spd: int):
    """What the local search lowers: (busiest device, sum of squared loads)."""
    dev = x.reshape(ep, spd).sum(axis=1)
    return float(dev.max()), float(np.dot(dev, dev))


def _better(new, old, scale: float) -> bool:
    if new[0] < old[0] - _EPS * scale:
        return True
    return new[0] <= old[0] + _EPS * scale and new[1] < old[1] - _EPS * scale * scale


def _swap_tries(slots: np.ndarray, x: np.ndarray, ep: int, spd: int, node_of: np.ndarray,
                tol: float, limit: int):
    """Up to `limit` swaps of a slot on a busiest device with a slot on a
    lighter device of the same node, best first: arrays (larger of the two
    loads after the swap with the shares kept, slot i, slot j); ties go to
    lower slot ids."""
    x_PS, e_PS = x.reshape(ep, spd), slots.reshape(ep, spd)
    dev = x_PS.sum(axis=1)
    top = dev.max()
    hot = np.flatnonzero(dev >= top - tol)
    cold = dev < top - tol
    # [hot, S, P, S]: slot (p, a) <-> slot (q, b)
    xa, xb = x_PS[hot][:, :, None, None], x_PS[None, None, :, :]
    worst = np.maximum(dev[hot][:, None, None, None] - xa + xb, dev[None, None, :, None] - xb + xa)
    ok = (cold & (node_of[None, :] == node_of[hot][:, None]))[:, None, :, None]
    ok = ok & (e_PS[hot][:, :, None, None] != e_PS[None, None, :, :])
    worst = np.where(ok, worst, np.inf).reshape(-1)
    shape = (hot.size, spd, ep, spd)
    i = np.broadcast_to((hot[:, None] * spd + np.arange(spd))[:, :, None, None], shape).reshape(-1)
    j = np.broadcast_to(np.arange(ep * spd).reshape(1, 1, ep, spd), shape).reshape(-1)
    finite = np.flatnonzero(np.isfinite(worst))
    if finite.size > limit:
        # the `limit` smallest, then sorted with the tie rule below
        cut = np.partition(worst[finite], limit - 1)[limit - 1]
        finite = finite[worst[finite] <= cut]
    order = finite[np.lexsort((j[finite], i[finite], worst[finite]))][:limit]
    return worst[order], i[order], j[order]


def _local_search(flat_slots: np.ndarray, x: np.ndarray, load: np.ndarray, ep: int, spd: int,
                  node_size: int):
    """Step 4: swap a slot of a busiest device with a slot elsewhere (same node).

    Swaps that gain with the shares kept are taken first (cheap); when none
    is left, re-split; when that gains nothing either, the best-looking swaps
    are re-split one by one and the first that gains is taken (at most
    _EXACT_TRIES of these in all: they are the costly part)."""
    slots, x = flat_slots.copy(), x.copy()
    scale = max(float(load.sum()) / ep, 1e-300)
    tol = _EPS * scale
    node_of = np.arange(ep) // node_size
    key = _key(x, ep, spd)
    budget = _EXACT_TRIES
    for _ in range(4 * ep * spd):
        if key[0] <= scale * (1 + _GOOD):
            break  # every device at the mean (nothing can do better), to _GOOD
        worst, ii, jj = _swap_tries(slots, x, ep, spd, node_of, tol, _EXACT_TRIES)
        if worst.size and worst[0] < key[0] - tol:  # gains with the shares kept
            i, j = ii[0], jj[0]
            slots[i], slots[j] = slots[j], slots[i]
            x[i], x[j] = x[j], x[i]
            key = _key(x, ep, spd)
            continue
        xs = balanced_split(slots, load, ep, spd)
        new = _key(xs, ep, spd)
        if _better(new, key, scale):
            x, key = xs, new
            continue
        moved = False
        for i, j in zip(ii[:budget], jj[:budget]):
            budget -= 1
            cand = slots.copy()
            cand[i], cand[j] = cand[j], cand[i]
            xc = balanced_split(cand, load, ep, spd)
            new = _key(xc, ep, spd)
            if _better(new, key, scale):
                slots, x, key, moved = cand, xc, new, True
                break
        if not moved:
            break
    return slots, x


def _node_spread(slots_PS: np.ndarray, node_size: int) -> int:
    """Sum over experts of (nodes holding it - 1): 0 when every expert keeps to one node."""
    nodes = slots_PS.shape[0] // node_size
    held = np.zeros((nodes, int(slots_PS.max()) + 1), bool)
    for n in range(nodes):
        held[n, slots_PS[n * node_size:(n + 1) * node_size].reshape(-1)] = True
    return int(held.sum() - held.any(axis=0).sum())


def balance(load_E, ep: int, slots_per_device: int, node_size: int = 0,
            replicas: int | None = None) -> Placement:
    """A placement for per-expert loads `load_E` [E] on `ep` devices with
    `slots_per_device` slots each that keeps the busiest device light
    (module docstring: the method). `node_size` > 1: devices per node, replicas
    kept within their expert's node where one node can carry them.
    `replicas`: how many of the `ep * slots_per_device - E` spare slots may
    carry rows (None: all). The others are *idle*: each holds a copy of an
    expert already on its device with a share of 0, so it computes nothing
    (every device has the same slot count, so `R = ep/2` replicas is
    `slots_per_device = E/ep + 1` with `replicas=ep//2`).
    Among the splits that give the chosen layout its device loads, the one
    whose busiest slot is lightest is kept (`flatten_slot_peak`): capacity
    dispatch sizes every slot alike.
    Deterministic: ties go to the lower expert, then device, index."""
    load = np.asarray(load_E, np.float64)
    if load.ndim != 1 or load.size == 0:
        raise ValueError(f"load_E has shape {load.shape}: must be [num_experts], non-empty.")
    e_count = load.shape[0]
    load = check_load(load, e_count)
    if not isinstance(ep, int) or ep < 1:
        raise ValueError(f"ep={ep!r} is invalid: must be a positive integer.")
    if not isinstance(slots_per_device, int) or slots_per_device < 1:
        raise ValueError(f"slots_per_device={slots_per_device!r} is invalid: must be a "
                         "positive integer.")
    if ep * slots_per_device < e_count:
        raise ValueError(f"slots_per_device={slots_per_device} is too small: {ep} devices x "
                         f"{slots_per_device} slots cannot hold {e_count} experts; use at "
                         f"least {-(-e_count // ep)}.")
    if not isinstance(node_size, int) or node_size < 0 or (node_size > 1 and ep % node_size):
        raise ValueError(f"node_size={node_size!r} is invalid: must be 0 or 1 (flat) or a "
                         f"divisor of ep={ep}.")
    spare = ep * slots_per_device - e_count
    if replicas is None:
        replicas = spare
    if not isinstance(replicas, (int, np.integer)) or not 0 <= replicas <= spare:
        raise ValueError(f"replicas={replicas!r} is invalid: must be an integer from 0 to "
                         f"{spare} ({ep} devices x {slots_per_device} slots - {e_count} "
                         "experts).")
    spd = slots_per_device
    node_size = node_size if node_size > 1 else ep
    # Idle slots are zero-load stand-in experts E, E+1, ...: the method places
    # them like any expert (last, being the lightest); they become idle
    # copies at the end.
    idle = spare - int(replicas)
    load = np.concatenate([normalized(load), np.zeros(idle)])
    r = _replica_counts(load, ep * spd)

    # (slots, devices per node its local search keeps to), in order of preference on ties
    candidates = []
    if e_count % ep == 0:
        # The static layout, its redundant slots (and idle ones) filled by the greedy.
        start = np.full((ep, spd), -1)
        start[:, :e_count // ep] = np.arange(e_count).reshape(ep, e_count // ep)
        candidates.append((_greedy_slots(load, r, ep, spd, node_size, start.reshape(-1)),
                           node_size))
    candidates.append((_greedy_slots(load, r, ep, spd, node_size), node_size))
    if node_size < ep:
        # Flat, for when keeping experts on one node costs balance.
        candidates.append((_greedy_slots(load, r, ep, spd, ep), ep))
    candidates.append((None, ep))

    best = None
    tol = _GOOD * max(float(load.sum()) / ep, 1e-300)
    for slots, local in candidates:
        if slots is None:  # the fill candidate, bounded by what the others reached
            slots = _fill_candidate(load, ep, spd, best[0])
            if slots is None:
                continue
        x = balanced_split(slots, load, ep, spd)
        slots, x = _local_search(slots, x, load, ep, spd, local)
        busiest = x.reshape(ep, spd).sum(axis=1).max()
        spread = _node_spread(slots.reshape(ep, spd), node_size)
        if (best is None or busiest < best[0] - tol
                or (busiest <= best[0] + tol and spread < best[1])):
            best = (busiest, spread, slots, x)
    _, _, slots, x = best
    x = flatten_slot_peak(slots, x, load, ep, spd)
    slots_PS = slots.reshape(ep, spd).copy()
    share_PS = shares_from_slot_loads(slots_PS, x.reshape(ep, spd), load)
    if idle:
        _make_idle(slots_PS, share_PS, e_count)
    return Placement(e_count, slots_PS, share_PS)


def _make_idle(slots_PS: np.ndarray, share_PS: np.ndarray, num_experts: int) -> None:
    """Stand-in experts (ids >= E) -> a share-0 copy of an expert already on
    the same device (its weights are local, and a move fills it from there);
    a device of stand-ins only takes expert 0. In place."""
    for p in range(slots_PS.shape[0]):
        real = [e for e in slots_PS[p] if e < num_experts]
        for s in range(slots_PS.shape[1]):
            if slots_PS[p, s] >= num_experts:
                slots_PS[p, s] = real[0] if real else 0
                share_PS[p, s] = 0


def with_shares(num_experts: int, slot_expert_PS, load_E) -> Placement:
    """These slots, with the shares that make devices most even under `load_E`
    (and, among those, the busiest slot lightest)."""
    slots = np.asarray(slot_expert_PS)
    Placement(num_experts, slots)  # validates the slots before the split reads them
    load = normalized(check_load(load_E, num_experts))
    ep, s = slots.shape
    x = flatten_slot_peak(slots.reshape(-1), balanced_split(slots.reshape(-1), load, ep, s),
                          load, ep, s)
    return Placement(num_experts, slots, shares_from_slot_loads(slots, x.reshape(ep, s), load))

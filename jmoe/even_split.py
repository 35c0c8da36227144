"""The most even split of each expert's rows among the slots that hold it
(NumPy, host side): given which devices hold which experts, the split of
every expert's estimated load over its replicas that makes device loads
lexicographically most even -- the busiest as light as possible, then the
next -- found exactly by max-flow. Used by `jmoe.balance`.
"""

from __future__ import annotations

import math

import numpy as np

from jmoe.placement import SHARE_UNITS

class _Flow:
    """Dinic's max flow on a small graph with float capacities."""

    def __init__(self, num_nodes: int, tol: float):
        self.adj = [[] for _ in range(num_nodes)]
        self.to, self.cap = [], []
        self.tol = tol

    def add(self, u: int, v: int, cap: float) -> int:
        """Edge u -> v; returns its id (its reverse is id ^ 1)."""
        self.adj[u].append(len(self.to))
        self.to.append(v)
        self.cap.append(cap)
        self.adj[v].append(len(self.to))
        self.to.append(u)
        self.cap.append(0.0)
        return len(self.to) - 2

    def _levels(self, s: int) -> list:
        level = [-1] * len(self.adj)
        level[s], queue = 0, [s]
        for u in queue:
            for k in self.adj[u]:
                if self.cap[k] > self.tol and level[self.to[k]] < 0:
                    level[self.to[k]] = level[u] + 1
                    queue.append(self.to[k])
        return level

    def run(self, s: int, t: int) -> float:
        total = 0.0
        while True:
            level = self._levels(s)
            if level[t] < 0:
                return total
            it = [0] * len(self.adj)

            def push(u, f):
                if u == t:
                    return f
                while it[u] < len(self.adj[u]):
                    k = self.adj[u][it[u]]
                    v = self.to[k]
                    if self.cap[k] > self.tol and level[v] == level[u] + 1:
                        got = push(v, min(f, self.cap[k]))
                        if got > self.tol:
                            self.cap[k] -= got
                            self.cap[k ^ 1] += got
                            return got
                    it[u] += 1
                return 0.0

            while True:
                f = push(s, math.inf)
                if f <= self.tol:
                    break
                total += f

    def reaches_source_side(self, s: int) -> set:
        """Nodes reachable from `s` through edges with room."""
        level = self._levels(s)
        return {u for u, lv in enumerate(level) if lv >= 0}

    def reaching(self, t: int) -> set:
        """Nodes that reach `t` through edges with room."""
        seen, queue = {t}, [t]
        for v in queue:
            for k in self.adj[v]:
                u = self.to[k]
                if u not in seen and self.cap[k ^ 1] > self.tol:
                    seen.add(u)
                    queue.append(u)
        return seen


def _most_even(hosts: list, load_X: list, base: list, scale: float) -> list:
    """The split of each multi-device expert x (devices `hosts[x]`, load
    `load_X[x]`) over its devices that makes device loads (`base` plus the
    split) lexicographically smallest: the busiest as light as possible, then
    the next, ... Returns [{device: amount}] per expert.

    Exact, by peeling off the busiest level: the busiest device set Y of any
    split is one maximising (base(Y) + load of experts with every device in
    Y) / |Y| (max-flow min-cut); found by Newton steps on a parametric max
    flow (source -> expert: its load; expert -> device; device -> sink: level
    - base), whose minimum cut names a denser set until the flow fits. Its
    experts are settled from that flow, the others never send load into it
    (it sits at the top level), and the rest is solved the same way.
    """
    tol = 1e-12 * scale
    base = list(base)
    amounts = [dict() for _ in hosts]
    live_hosts = [list(h) for h in hosts]
    live_x = set(range(len(hosts)))
    while live_x:
        for x in [x for x in live_x if len(live_hosts[x]) == 1]:
            (d,) = live_hosts[x]
            amounts[x][d] = amounts[x].get(d, 0.0) + load_X[x]
            base[d] += load_X[x]
            live_x.discard(x)
        if not live_x:
            break
        devs = sorted({d for x in live_x for d in live_hosts[x]})
        xs = sorted(live_x)
        node = {d: 1 + len(xs) + i for i, d in enumerate(devs)}
        sink = 1 + len(xs) + len(devs)
        need = sum(load_X[x] for x in xs)
        level = max((sum(base[d] for d in devs) + need) / len(devs), max(base[d] for d in devs))
        for _ in range(len(devs) + 2):
            flow = _Flow(sink + 1, tol)
            edges = {}
            for i, x in enumerate(xs):
                flow.add(0, 1 + i, load_X[x])
                for d in live_hosts[x]:
                    edges[(x, d)] = flow.add(1 + i, node[d], math.inf)
            for d in devs:
                flow.add(node[d], sink, max(level - base[d], 0.0))
            if flow.run(0, sink) >= need - tol * len(xs):
                break
            side = flow.reaches_source_side(0)
            ys = [d for d in devs if node[d] in side]
            forced = sum(load_X[x] for i, x in enumerate(xs) if 1 + i in side)
            denser = (sum(base[d] for d in ys) + forced) / max(len(ys), 1)
            if not ys or denser <= level:
                break  # rounding: the flow fits to within tolerance
            level = denser
        reach_t = flow.reaching(sink)
        top = {d for d in devs if node[d] not in reach_t} or set(devs)
        for i, x in enumerate(xs):
            if set(live_hosts[x]) <= top:
                for d in live_hosts[x]:
                    got = flow.cap[edges[(x, d)] ^ 1]
                    if got > 0:
                        amounts[x][d] = amounts[x].get(d, 0.0) + got
                live_x.discard(x)
            else:
                live_hosts[x] = [d for d in live_hosts[x] if d not in top]
    return amounts


def balanced_split(flat_slots: np.ndarray, load: np.ndarray, ep: int, spd: int) -> np.ndarray:
    """Step 3: float64 [P*S] load each slot carries under the most even split
    (`_most_even`); an expert's load on one device is split evenly among its
    slots there."""
    dev_of = np.arange(flat_slots.shape[0]) // spd
    slots_on = {}  # (expert, device) -> slot ids
    for i, e in enumerate(flat_slots.tolist()):
        slots_on.setdefault((e, int(dev_of[i])), []).append(i)
    devices_of = {}
    for e, d in slots_on:
        devices_of.setdefault(e, []).append(d)
    base = [0.0] * ep
    multi = []
    for e, devs in devices_of.items():
        if len(devs) == 1:
            base[devs[0]] += float(load[e])
        else:
            multi.append(e)
    # Devices linked by shared experts form independent problems: solve each alone.
    root = list(range(ep))

    def find(d):
        while root[d] != d:
            root[d] = root[root[d]]
            d = root[d]
        return d

    for e in multi:
        for d in devices_of[e][1:]:
            root[find(d)] = find(devices_of[e][0])
    groups = {}
    for e in multi:
        groups.setdefault(find(devices_of[e][0]), []).append(e)
    scale = max(float(load.sum()) / ep, 1e-300)
    amounts = {}
    for es in groups.values():
        got = _most_even([devices_of[e] for e in es], [float(load[e]) for e in es], base, scale)
        amounts.update(zip(es, got))
    x = np.empty(flat_slots.shape[0])
    for (e, d), ids in slots_on.items():
        if len(devices_of[e]) == 1:
            x[ids] = load[e] / len(ids)
    for e, amount in amounts.items():
        for d in devices_of[e]:
            x[slots_on[(e, d)]] = amount.get(d, 0.0) / len(slots_on[(e, d)])
    return x


def shares_from_slot_loads(slots_PS: np.ndarray, x_PS: np.ndarray, load: np.ndarray):
    """Integer shares [P, S] from slot loads: cumulative fractions rounded, so
    each expert's shares sum to exactly SHARE_UNITS (equal if it has no load)."""
    flat, xf = slots_PS.reshape(-1), x_PS.reshape(-1)
    share = np.zeros(flat.shape, np.int64)
    for e in np.unique(flat):
        ids = np.flatnonzero(flat == e)
        frac = np.maximum(xf[ids], 0.0)
        if not frac.sum() > 0:  # no load (or too little for the flow's tolerance)
            frac = np.ones(len(ids))
        cut = np.rint(np.cumsum(frac) / frac.sum() * SHARE_UNITS).astype(np.int64)
        cut[-1] = SHARE_UNITS
        share[ids] = np.diff(cut, prepend=0)
    return share.reshape(slots_PS.shape)




def flatten_slot_peak(flat_slots: np.ndarray, x: np.ndarray, load: np.ndarray, ep: int,
                      spd: int, steps: int = 40) -> np.ndarray:
    """The split of the same slots with the same device loads as `x` (float64
    [P*S] slot loads) whose busiest SLOT is as light as possible: a replicated
    expert's rows spread over its replicas instead of piling on one.

    Why: capacity dispatch gives every slot the same buffer, so one slot far
    above the others drops rows even when devices are even. Device loads are
    kept (each device at most its load in `x`, so all equal to it), so the
    busiest device never changes. Bisection on a slot cap c with a max-flow
    feasibility check (source -> expert: its load; expert -> each of its
    slots: c; slot -> its device: the device's load in `x`; device -> sink)."""
    n = flat_slots.shape[0]
    dev_of = np.arange(n) // spd
    dev_P = np.bincount(dev_of, weights=x, minlength=ep)
    experts = sorted(set(flat_slots.tolist()))
    replicas = {e: np.flatnonzero(flat_slots == e) for e in experts}
    scale = max(float(load.sum()) / ep, 1e-300)
    tol = 1e-9 * scale
    # No split puts less than load / replicas on an expert's busiest replica.
    low = max(float(load[e]) / len(replicas[e]) for e in experts)
    high = float(x.max())
    if high <= low * (1 + 1e-6) + tol:
        return x
    need = float(sum(load[e] for e in experts))

    def split(cap: float):
        flow = _Flow(1 + len(experts) + n + ep + 1, tol * 1e-3)
        sink = len(experts) + n + ep + 1
        edges = []
        for i, e in enumerate(experts):
            flow.add(0, 1 + i, float(load[e]))
            for s in replicas[e]:
                edges.append((s, flow.add(1 + i, 1 + len(experts) + s, cap)))
        for s in range(n):
            flow.add(1 + len(experts) + s, 1 + len(experts) + n + dev_of[s], math.inf)
        for p in range(ep):
            flow.add(1 + len(experts) + n + p, sink, float(dev_P[p]) + tol)
        if flow.run(0, sink) < need - tol * len(experts):
            return None
        out = np.zeros(n)
        for s, k in edges:
            out[s] = flow.cap[k ^ 1]
        return out

    best = x
    for _ in range(steps):
        if high - low <= 1e-6 * scale:  # below what integer shares resolve
            break
        mid = (low + high) / 2
        got = split(mid)
        if got is None:
            low = mid
        else:
            best, high = got, mid
    return best

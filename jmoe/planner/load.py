"""Token imbalance: the load distribution over experts (`load_E`, fractions
of the T*K assignments) and what it costs -- capacity drops, receive-buffer
drops and the chance that a dropless bucket holds every (source,
destination) pair. Token counts are binomial, taken in their normal
approximation.
"""

from __future__ import annotations

import math
from typing import Sequence


def load_distribution(spec, num_experts: int) -> tuple[float, ...]:
    """Fractions of the assignments per expert, summing to 1.

    `spec`: None / "uniform"; "zipf:S" (p_e ~ 1/(e+1)^S, the hottest experts
    on the first device); "hot:R" (expert 0 gets R x the mean, the rest share
    the remainder); a comma list or sequence of E non-negative weights (e.g.
    the `expert_load` the trainer logs to metrics.jsonl).
    """
    e = num_experts
    if spec is None or (isinstance(spec, str) and spec.strip() in ("", "uniform")):
        w = [1.0] * e
    elif isinstance(spec, str) and spec.startswith("zipf:"):
        s = float(spec[5:])
        w = [1.0 / (i + 1) ** s for i in range(e)]
    elif isinstance(spec, str) and spec.startswith("hot:"):
        r = float(spec[4:])
        if not 1.0 <= r <= e:
            raise ValueError(f"load 'hot:{r}': the ratio must be in [1, num_experts={e}].")
        rest = (e - r) / (e - 1) if e > 1 else 0.0
        w = [r] + [rest] * (e - 1)
    else:
        w = [float(v) for v in (spec.split(",") if isinstance(spec, str) else spec)]
        if len(w) != e:
            raise ValueError(f"load has {len(w)} entries but num_experts={e}: give one "
                             "weight per expert (or 'uniform', 'zipf:S', 'hot:R').")
    if any(v < 0 for v in w) or sum(w) <= 0:
        raise ValueError(f"load {spec!r}: weights must be >= 0 with a positive sum.")
    tot = sum(w)
    return tuple(v / tot for v in w)


def _expected_excess(mean: float, var: float, cap: float) -> float:
    """E[max(0, X - cap)] for X ~ Normal(mean, var)."""
    if var <= 0:
        return max(0.0, mean - cap)
    sd = math.sqrt(var)
    z = (cap - mean) / sd
    pdf = math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    tail = 0.5 * math.erfc(z / math.sqrt(2))
    return max(0.0, sd * pdf + (mean - cap) * tail)


def capacity_drop_fraction(load_E: Sequence[float], assignments: int, capacity: int) -> float:
    """Expected share of a shard's `assignments` that find no slot."""
    lost = sum(_expected_excess(assignments * p, assignments * p * (1 - p), capacity)
               for p in load_E)
    return min(1.0, lost / max(assignments, 1))


def device_loads(load_E: Sequence[float], ep: int) -> list:
    """Share of the assignments that lands on each expert-parallel device."""
    el = len(load_E) // ep
    return [sum(load_E[j * el:(j + 1) * el]) for j in range(ep)]


def recv_drop_fraction(load_E: Sequence[float], ep: int, assignments: int,
                       recv_rows: int) -> float:
    """Expected share dropped by a dropless receive buffer of `recv_rows`."""
    if recv_rows >= ep * assignments:
        return 0.0
    lost = 0.0
    for q in device_loads(load_E, ep):
        n = ep * assignments
        lost += _expected_excess(n * q, n * q * (1 - q), recv_rows)
    return min(1.0, lost / (ep * assignments))


def prob_pairs_fit(load_E: Sequence[float], ep: int, assignments: float, slot: int) -> float:
    """Probability that no (source shard, destination device) pair exceeds
    `slot` rows when each of ep sources sends `assignments` rows (binomial
    counts, normal approximation with continuity correction; sources
    independent)."""
    p = 1.0
    for q in device_loads(load_E, ep):
        mu, var = assignments * q, assignments * q * (1.0 - q)
        if var <= 0:
            p *= 1.0 if mu <= slot else 0.0
            continue
        z = (slot + 0.5 - mu) / math.sqrt(var)
        p *= (0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))) ** ep
    return p


def bucket_probabilities(load_E: Sequence[float], ep: int, assignments: float,
                         slots: Sequence[int]) -> list:
    """Probability that a step runs each bucket of `slots` (smallest first)
    and, last, the fallback buffer: the smallest bucket that holds the
    busiest pair of the mesh is taken."""
    probs, taken = [], 0.0
    for p_fit in (prob_pairs_fit(load_E, ep, assignments, s) for s in slots):
        probs.append(max(0.0, p_fit - taken))
        taken = max(taken, p_fit)
    probs.append(1.0 - taken)
    return probs

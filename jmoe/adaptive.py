"""Run-time choice among compiled variants of one step (Tutel's adaptive
switching, issue 18).

`PlanSwitch` holds several compiled versions of the same computation -- the
same arguments, the same results to float rounding, different execution
plans (overlap chunks, all-to-all algorithm, ...) -- times each on real
calls, and then runs the fastest. Because every variant is compiled once
and the choice is a Python-side dispatch, switching never recompiles.

    steps = {name: jax.jit(functools.partial(step, cfg=cfg_of(name)))
             for name in ("flat", "2dh")}
    switch = jmoe.adaptive.PlanSwitch(steps, trials=3)
    for batch in data:
        state, metrics = switch(state, batch)      # times, then runs the fastest
        if load_moved(metrics):
            switch.retime()                        # time them all again

Timing: a variant's first call compiles and is not timed; then the
variants take turns, `trials` timed calls each (each waits for its result,
so a timing phase gives up the overlap of dispatching one call while the
last one runs). A variant whose timed calls all took more than `prune`
times the fastest median so far is not timed again in that round: a plan
three times slower than the best costs one blocking call per round, not
`trials` of them.
The plan with the smallest median wins. `retime_every` (calls) re-times on
a schedule; `retime()` on demand, e.g. when the expert loads shift.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Mapping, Optional


@dataclasses.dataclass
class Choice:
    """A finished timing round: median seconds per variant and the winner."""

    call: int  # calls made before the round finished
    medians: dict
    chosen: str

    def message(self) -> str:
        times = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in self.medians.items())
        return f"adaptive plans timed ({times}): running {self.chosen}"


PRUNE_RULE = "must be > 1 (times the fastest median), or 0 to time every variant `trials` times."


def prune_ok(prune) -> bool:
    """`prune` is 0 (off) or a factor above 1 (`PlanSwitch`, `config.adaptive`)."""
    return isinstance(prune, (int, float)) and (prune == 0 or prune > 1)


class PlanSwitch:
    """Runs the fastest of several compiled variants of one step (module docstring).

    Args:
      variants: {name: callable}, each already jitted; all take the same
        arguments and return the same structure.
      trials: timed calls per variant in a timing round (after its first).
      retime_every: calls between timing rounds; 0 = only at the start and
        on `retime()`.
      prune: a variant whose best timed call exceeds `prune` times the
        fastest variant's median so far is not timed again in the round
        (it stays a candidate with the times it has); 0 = time every
        variant `trials` times.
      block: waits for a result (default `jax.block_until_ready`).
      on_choice: called with each finished `Choice` (e.g. to log it).
    """

    def __init__(self, variants: Mapping[str, Callable], *, trials: int = 2,
                 retime_every: int = 0, prune: float = 1.5,
                 block: Optional[Callable[[Any], Any]] = None,
                 clock: Callable[[], float] = time.perf_counter,
                 on_choice: Optional[Callable[[Choice], None]] = None):
        if not variants:
            raise ValueError("PlanSwitch needs at least one variant.")
        if not isinstance(trials, int) or trials < 1:
            raise ValueError(f"trials={trials!r} is invalid: must be an integer >= 1.")
        if not isinstance(retime_every, int) or retime_every < 0:
            raise ValueError(f"retime_every={retime_every!r} is invalid: must be an "
                             "integer >= 0 (0 = only on retime()).")
        if not prune_ok(prune):
            raise ValueError(f"prune={prune!r} is invalid: {PRUNE_RULE}")
        if block is None:
            import jax
            block = jax.block_until_ready
        self.variants = dict(variants)
        self.names = list(self.variants)
        self.trials, self.retime_every, self.prune = trials, retime_every, prune
        self.block, self.clock, self.on_choice = block, clock, on_choice
        self.calls = 0
        self.current = self.names[0]
        self.last: Optional[str] = None  # the variant the last call ran
        self.choices: list[Choice] = []
        self._warm: set = set()
        self._queue: list = []
        self._times: dict = {}
        self._last_round = 0
        self.retime()

    @property
    def timing(self) -> bool:
        """True while a timing round is under way."""
        return bool(self._queue)

    def retime(self) -> None:
        """Starts a timing round at the next call: every variant, `trials`
        timed calls each (plus one untimed first call if it never ran)."""
        self._times = {n: [] for n in self.names}
        # Round-robin, not one variant's trials in a block: a drift in the
        # machine's speed (other jobs, clocks) then hits every variant alike.
        self._queue = [n for _ in range(self.trials) for n in self.names]

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if not self._queue and self.retime_every and \
                self.calls - self._last_round > self.retime_every:
            self.retime()
        if not self._queue:
            self.last = self.current
            return self.variants[self.current](*args, **kwargs)
        name = self.last = self._queue[0]
        fn = self.variants[name]
        if name not in self._warm:  # compile + first run: not timed, not counted
            self._warm.add(name)
            return self.block(fn(*args, **kwargs))
        t0 = self.clock()
        out = self.block(fn(*args, **kwargs))
        self._times[name].append(self.clock() - t0)
        self._queue.pop(0)
        if self.prune:
            self._drop_slow()
        if not self._queue:
            self._finish()
        return out

    def _drop_slow(self) -> None:
        """Takes the variants that are clearly slower (`prune`) out of the
        rest of this round's queue."""
        timed = {n: t for n, t in self._times.items() if t}
        best = min(statistics.median(t) for t in timed.values())
        slow = {n for n, t in timed.items() if min(t) > self.prune * best}
        self._queue = [n for n in self._queue if n not in slow]

    def _finish(self) -> None:
        medians = {n: statistics.median(t) for n, t in self._times.items() if t}
        self.current = min(medians, key=lambda n: (medians[n], self.names.index(n)))
        self._last_round = self.calls
        choice = Choice(self.calls, medians, self.current)
        self.choices.append(choice)
        if self.on_choice is not None:
            self.on_choice(choice)

"""Compile time and XLA's memory analysis of a jitted step, ahead of time.

    compiled, report = compile_report.compile_step(train_fn, state, batch_BT1)
    print(report.line("train step"))
    # train step: compiled in 12.3 s (lowering 1.1 s); XLA memory per device:
    #   arguments 55.1 MB, outputs 55.1 MB (54.9 MB donated), temporaries 210.4 MB,
    #   peak about 265.7 MB

`jax.jit(f).lower(*args).compile()` is the same compilation the first call
would do, and JAX caches it: the trainer's first step after `compile_step`
does not compile again. The arguments may be arrays or
`jax.ShapeDtypeStruct`s carrying their shardings.

XLA's numbers are per device (the partitioned program): `arguments` holds
the state shards and this device's batch rows, `outputs` the new state and
metrics, `temporaries` the gradients, the activations kept for the backward
and scratch. Donated arguments alias their outputs, so the peak is about
arguments + outputs - aliased + temporaries.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """Seconds to lower and compile, and XLA's per-device bytes."""

    lower_s: float
    compile_s: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs that reuse a donated argument's buffer
    temp_bytes: int

    @property
    def peak_bytes(self) -> int:
        """XLA's estimate of the step's live bytes per device at its peak."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def as_dict(self) -> dict:
        return dict(dataclasses.asdict(self), peak_bytes=self.peak_bytes)

    def line(self, what: str = "train step") -> str:
        """One log line: compile time, then the memory analysis."""
        mb = lambda n: f"{n / 2**20:,.1f} MB"
        return (f"{what}: compiled in {self.compile_s:.1f} s (lowering {self.lower_s:.1f} s); "
                f"XLA memory per device: arguments {mb(self.argument_bytes)}, outputs "
                f"{mb(self.output_bytes)} ({mb(self.alias_bytes)} donated), temporaries "
                f"{mb(self.temp_bytes)}, peak about {mb(self.peak_bytes)}")


def compile_step(jitted: Callable, *args: Any, **kwargs: Any) -> tuple[Any, CompileReport]:
    """Lowers and compiles `jitted` for `args` (arrays or ShapeDtypeStructs);
    returns the compiled executable and its `CompileReport`."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args, **kwargs)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    ma = compiled.memory_analysis()
    # Some backends answer None (no analysis); report zeros, not a crash.
    get = lambda name: int(getattr(ma, name, 0) or 0) if ma is not None else 0
    return compiled, CompileReport(
        lower_s=t1 - t0, compile_s=t2 - t1, argument_bytes=get("argument_size_in_bytes"),
        output_bytes=get("output_size_in_bytes"), alias_bytes=get("alias_size_in_bytes"),
        temp_bytes=get("temp_size_in_bytes"))


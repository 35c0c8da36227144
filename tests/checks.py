"""Comparisons and spies shared by the tests."""

import jax
import numpy as np

from jmoe.sharding import exchange


def assert_tree_close(got, want, rtol=1e-5):
    """Equal to `rtol` relative to each leaf's largest entry (sums over shards
    run in another order, so single elements near zero differ in the last bits)."""
    lg, lw = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(lg) == len(lw)
    for g, w in zip(lg, lw):
        w = np.asarray(w)
        scale = float(np.max(np.abs(w))) if w.size else 0.0
        np.testing.assert_allclose(np.asarray(g), w, rtol=rtol, atol=rtol * scale + 1e-7)


def record_exchange_buffers(monkeypatch) -> list:
    """Patches the dropless exchange so that every run appends the rows of
    the receive buffer it used (seen at run time, so only from the branch of
    the `ep_buckets` switch that ran); returns the list it fills."""
    seen = []
    inner = exchange._exchange_and_run

    def spy(*args, rows, **kw):
        jax.debug.callback(lambda: seen.append(rows))
        return inner(*args, rows=rows, **kw)

    monkeypatch.setattr(exchange, "_exchange_and_run", spy)
    return seen

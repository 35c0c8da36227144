"""Every test sees 8 CPU devices; this must run before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from jmoe.runtime.xla_flags import configure_cpu_workarounds  # noqa: E402

configure_cpu_workarounds()  # before any backend starts (see its docstring)

import jax  # noqa: E402  (imported after the flag on purpose)

jax.config.update("jax_default_matmul_precision", "highest")

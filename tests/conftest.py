"""Every test sees 8 CPU devices; this must run before jax is imported.

One persistent XLA compilation cache serves the whole test run: the xdist
workers and the train.py processes the tests launch. Many tests compile the
same program again (every `loop.run` of one config, each relaunch of a killed
run), and compilation is most of their time. A cache hit loads the same
executable (the compiled HLO is identical, only its debug tables differ), so
no result changes; the run that created the directory removes it at exit.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The first pytest process (xdist's controller, or the only one under -n 0)
# makes the directory; the workers it starts, and their subprocesses, inherit
# the variables. A cache the user set up is used as it is, and kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jmoe-tests-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
    # Cache every program, not only those over JAX's default 1 s of compile:
    # each train.py launch or loop.run also compiles dozens of small programs
    # (init, eval, checksums, ...), which add up. Measured: a relaunch of a
    # tiny train.py run 9.4-10.0 s -> 7.0-7.3 s.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from jmoe.runtime.xla_flags import configure_cpu_workarounds  # noqa: E402

configure_cpu_workarounds()  # before any backend starts (see its docstring)

import jax  # noqa: E402  (imported after the flag on purpose)

jax.config.update("jax_default_matmul_precision", "highest")

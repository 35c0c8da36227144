"""Process start-up: multi-host initialisation (`distributed`) and the XLA
flags that must be set before JAX starts a backend (`xla_flags`).

Nothing here knows about MoE layers or meshes; the trainer and the
benchmarks call it first.
"""

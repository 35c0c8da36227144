"""Device meshes, partition specs and explicit expert parallelism."""

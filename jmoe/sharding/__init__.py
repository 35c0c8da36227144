"""Device meshes, partition specs and explicit expert parallelism."""

from jmoe.sharding import specs
from jmoe.sharding.mesh import AXES, axis_size, make_mesh, mesh_shape

__all__ = ["AXES", "axis_size", "make_mesh", "mesh_shape", "specs"]

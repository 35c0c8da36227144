"""Device meshes, partition specs and explicit expert parallelism."""

from jmoe.sharding import specs
from jmoe.sharding.mesh import AXES, axis_size, make_mesh, mesh_shape
from jmoe.sharding.params import init_params_sharded, moe_shardings

__all__ = ["AXES", "axis_size", "make_mesh", "mesh_shape", "specs", "init_params_sharded",
           "moe_shardings"]

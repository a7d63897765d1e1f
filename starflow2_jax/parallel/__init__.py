"""Scale-out: device meshes, logical-axis rules, and shardings of variables, batches and activations."""

from starflow2_jax.parallel.mesh import AXIS_TYPES, MESH_AXES, make_mesh, mesh_shape
from starflow2_jax.parallel.rules import (BATCH_AXES, DEFAULT_RULES, FAE_RULES, FLOW_RULES, PRETZEL_RULES,
                                          VLM_RULES, axes_size, fit_spec)
from starflow2_jax.parallel.sharding import (activation_rules, batch_sharding, init_sharded, logical_shardings,
                                             shard_batch, shard_variables, variable_shardings)

__all__ = [
    "AXIS_TYPES", "BATCH_AXES", "DEFAULT_RULES", "FAE_RULES", "FLOW_RULES", "MESH_AXES", "PRETZEL_RULES",
    "activation_rules", "axes_size", "batch_sharding", "fit_spec", "init_sharded", "logical_shardings",
    "make_mesh", "mesh_shape", "shard_batch", "shard_variables", "variable_shardings", "VLM_RULES",
]

"""Scale-out: device meshes, logical-axis rules, and shardings of variables, batches and activations;
the multi-host runtime (``runtime``), the preemption agreement (``preemption``) and ahead-of-time
compiles for TPU topologies (``aot``, imported on demand: it is only for ``starflow2 aot``)."""

from starflow2_jax.parallel.mesh import AXIS_TYPES, MESH_AXES, make_mesh, mesh_shape, num_slices
from starflow2_jax.parallel.preemption import StopAgreement
from starflow2_jax.parallel.rules import (BATCH_AXES, DEFAULT_RULES, FAE_RULES, FLOW_RULES, PRETZEL_RULES,
                                          VLM_RULES, axes_size, fit_spec)
from starflow2_jax.parallel.runtime import (DistributedError, Runtime, add_host_log, initialize, process_0_first,
                                            remove_host_log, set_compilation_cache)
from starflow2_jax.parallel.sharding import (activation_rules, batch_sharding, init_sharded, logical_shardings,
                                             shard_batch, shard_variables, variable_shardings)

__all__ = [
    "AXIS_TYPES", "BATCH_AXES", "DEFAULT_RULES", "DistributedError", "FAE_RULES", "FLOW_RULES", "MESH_AXES",
    "PRETZEL_RULES", "Runtime", "StopAgreement", "activation_rules", "add_host_log", "axes_size", "batch_sharding",
    "fit_spec", "init_sharded", "initialize", "logical_shardings", "make_mesh", "mesh_shape", "num_slices",
    "process_0_first", "remove_host_log", "set_compilation_cache", "shard_batch", "shard_variables",
    "variable_shardings", "VLM_RULES",
]

"""Shardings of variables and batches, derived from logical axis names and a rules table.

Variables: ``jax.eval_shape`` of a model's boxed ``init`` gives every parameter's shape and logical
names (``nn.Partitioned`` leaves); the rules turn names into mesh axes and ``fit_spec`` replicates
any dimension the mesh axes do not divide. Leaves without names (e.g. the flow's ``prior``
collection) are replicated. Batches are split over ``('data', 'fsdp')`` on their leading axis.

Activations: the models call ``nn.with_logical_constraint``, which only acts while a mesh and a
rules table are active at *trace* time — run (and first compile) the model inside
``activation_rules(mesh, rules)``. JAX's jit cache keys on the active mesh but not on Flax's rules,
so within one process use one rules table per mesh (or ``jax.clear_caches()`` after switching).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from starflow2_jax.parallel.rules import BATCH_AXES, FLOW_RULES, Rules, axes_size, fit_spec


def _is_boxed(x) -> bool:
    return isinstance(x, nn.Partitioned)


def logical_shardings(abstract_boxed_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """A tree of ``NamedSharding`` with the structure of the *unboxed* variables.

    ``abstract_boxed_tree`` is ``jax.eval_shape`` of a Flax ``init`` whose parameters are
    ``nn.Partitioned`` boxes (``nn.with_logical_partitioning``). Each boxed leaf gets
    ``rules``' mesh axes for its logical names, with non-dividing dimensions replicated; unboxed
    leaves are replicated. Raises ValueError for a logical name the rules table does not mention
    (a forgotten rule would otherwise replicate silently) or a rule naming an axis ``mesh`` lacks.
    """
    known = {name for name, _ in rules}
    for name, axes in rules:
        for axis in ((axes,) if isinstance(axes, str) else tuple(axes or ())):
            if axis not in mesh.shape:
                raise ValueError(f"rule ({name!r}, {axes!r}) names mesh axis {axis!r}; "
                                 f"the mesh has {tuple(mesh.shape)}")

    def leaf_sharding(path, leaf):
        if not _is_boxed(leaf):
            return NamedSharding(mesh, PartitionSpec())
        if not hasattr(leaf.value, "shape"):  # optax.MaskedNode: a frozen parameter's (empty) optimiser state
            return leaf.value
        missing = [name for name in leaf.names if isinstance(name, str) and name not in known]
        if missing:
            raise ValueError(f"variable {jax.tree_util.keystr(path)} has logical axis name(s) {missing} "
                             f"with no rule in the rules table (names covered: {sorted(known)})")
        spec = nn.logical_to_mesh_axes(leaf.names, rules)
        return NamedSharding(mesh, fit_spec(spec, leaf.value.shape, mesh))

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_boxed_tree, is_leaf=_is_boxed)


def variable_shardings(init_boxed_fn: Callable[[jax.Array], Any], mesh: Mesh, rules: Rules) -> Any:
    """``NamedSharding``s for the unboxed variables that ``init_boxed_fn(rng)`` creates, derived from
    ``jax.eval_shape`` (no memory is touched): boxed params by ``rules``, anything else replicated."""
    abstract = jax.eval_shape(init_boxed_fn, jax.random.key(0))
    return logical_shardings(abstract, mesh, rules)


def init_sharded(init_boxed_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh, rules: Rules) -> Any:
    """The unboxed variables of ``init_boxed_fn(rng)`` (a Flax init whose params carry logical
    names, e.g. ``functools.partial(flow.init_boxed, config)``), created directly in their sharded
    layout by a jit with ``out_shardings``, so no device ever holds the full parameter set."""
    shardings = variable_shardings(init_boxed_fn, mesh, rules)
    return jax.jit(lambda key: nn.meta.unbox(init_boxed_fn(key)), out_shardings=shardings)(rng)


def shard_variables(variables: Any, shardings: Any) -> Any:
    """``variables`` placed with ``shardings`` (same tree structure), via ``jax.device_put``."""
    return jax.device_put(variables, shardings)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """``NamedSharding(mesh, P(('data', 'fsdp'), None, …))`` for a rank-``ndim`` batch array."""
    if ndim < 1:
        raise ValueError(f"batch_sharding: ndim={ndim}, a batch needs a leading batch axis (ndim >= 1)")
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Global arrays from this process's slice of a batch (an array or a pytree of arrays).

    Every leaf's leading axis is the batch, split over ``('data', 'fsdp')``; on several processes
    each passes its own consecutive slice (``jax.make_array_from_process_local_data``), on one
    process this equals ``jax.device_put`` with ``batch_sharding``. Raises ValueError when the
    global batch is not divisible by the number of batch shards.
    """
    shards = axes_size(mesh, BATCH_AXES)

    def put(x):
        ndim = jnp.ndim(x)
        if ndim == 0:
            raise ValueError("shard_batch: got a scalar; every leaf needs a leading batch axis")
        global_batch = jnp.shape(x)[0] * jax.process_count()
        if global_batch % shards:
            raise ValueError(f"shard_batch: global batch {global_batch} is not divisible by the {shards} "
                             f"batch shards (mesh axes {BATCH_AXES})")
        return jax.make_array_from_process_local_data(batch_sharding(mesh, ndim), x)

    return jax.tree_util.tree_map(put, batch)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules = FLOW_RULES) -> Iterator[Mesh]:
    """Context in which ``mesh`` is the current mesh (``jax.set_mesh``) and ``rules`` are Flax's
    logical-axis rules, so the models' ``nn.with_logical_constraint`` become sharding constraints.

    Must be active when a jitted model function is traced (its first call for given shapes).
    Yields ``mesh``.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield mesh

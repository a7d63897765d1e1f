"""Device mesh construction: axes ``('data', 'fsdp', 'tensor')`` with one size optionally inferred.

Axis types: every mesh in this project is built with ``AxisType.Auto`` on all axes. Shardings are
then *hints* to the GSPMD/Shardy partitioner: parameters and batches carry ``NamedSharding``s
derived from logical axis names, ``nn.with_logical_constraint`` pins activations at block
boundaries, and the compiler propagates everything in between. This is the mode Flax's logical
partitioning (``nn.logical_axis_rules``, ``with_logical_constraint``) is written for, and it needs
no sharding annotations in the model code itself. ``jax.make_mesh`` defaults to ``Explicit`` axes
(sharding-in-types), where every op's output sharding must be resolvable at trace time and flax's
bare-``PartitionSpec`` constraints and our unannotated ``jnp`` code (KV-cache creation, guidance
concatenation over the batch) would need explicit ``reshard``s; we therefore always pass
``axis_types`` explicitly and never rely on either default.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")
AXIS_TYPES = (AxisType.Auto,) * len(MESH_AXES)


def mesh_shape(shape: Mapping[str, int] | Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Resolves ``shape`` to one size per axis of ``MESH_AXES`` whose product is ``num_devices``.

    ``shape`` is a mapping ``{'data': 2, 'fsdp': -1, ...}`` (missing axes are 1) or a sequence of
    three sizes in ``MESH_AXES`` order; at most one size may be -1 (filled from ``num_devices``).
    Raises ValueError naming the bad value.
    """
    if isinstance(shape, Mapping):
        unknown = [name for name in shape if name not in MESH_AXES]
        if unknown:
            raise ValueError(f"mesh shape {dict(shape)}: unknown axis name(s) {unknown}; "
                             f"expected a subset of {MESH_AXES}")
        sizes = [shape.get(name, 1) for name in MESH_AXES]
    else:
        sizes = list(shape)
        if len(sizes) != len(MESH_AXES):
            raise ValueError(f"mesh shape {tuple(sizes)}: expected {len(MESH_AXES)} sizes for axes {MESH_AXES}")
    for name, size in zip(MESH_AXES, sizes):
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
            raise ValueError(f"mesh axis {name!r} size {size!r}: expected an int (or -1 to infer it)")
        if size == 0 or size < -1:
            raise ValueError(f"mesh axis {name!r} size {size}: expected a positive size or -1 to infer it")
    inferred = [name for name, size in zip(MESH_AXES, sizes) if size == -1]
    if len(inferred) > 1:
        raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1, got {inferred}")
    known = math.prod(size for size in sizes if size != -1)
    if inferred:
        if num_devices % known:
            raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))}: cannot infer {inferred[0]!r}, "
                             f"{num_devices} devices are not divisible by the other axes' product {known}")
        sizes = [num_devices // known if size == -1 else size for size in sizes]
    elif known != num_devices:
        raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))}: product {known} does not match "
                         f"the {num_devices} devices")
    return tuple(int(size) for size in sizes)


def num_slices(devices: Sequence[jax.Device]) -> int:
    """How many TPU slices ``devices`` span (``slice_index``; 1 for CPU/GPU devices, which have none)."""
    return len({getattr(d, "slice_index", 0) or 0 for d in devices})


def make_mesh(shape: Mapping[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` over ``devices`` (default: all of ``jax.devices()``) with axes ``MESH_AXES``, all Auto.

    See ``mesh_shape`` for ``shape`` (the *global* sizes). Device order comes from ``jax.make_mesh``
    (topology-aware on TPU/GPU, so ``tensor`` — the innermost axis — lands on the fastest
    interconnect). Multi-slice (devices on K > 1 TPU slices): the ``data`` axis is split K ways over
    the slices (DCN, ``mesh_utils.create_hybrid_device_mesh``) and ``data / K``, ``fsdp``,
    ``tensor`` within each slice (ICI), so only the gradient all-reduce crosses DCN. Raises
    ValueError when the sizes do not fit the devices (naming both).
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh: the device list is empty")
    try:
        sizes = mesh_shape(shape, len(devices))
    except ValueError as error:
        raise ValueError(f"{error} (this job has {len(devices)} devices in {jax.process_count()} process(es); "
                         f"set the config's mesh.data / mesh.fsdp / mesh.tensor so their product is "
                         f"{len(devices)}, or one of them to -1)") from error
    slices = num_slices(devices)
    if slices == 1:
        return jax.make_mesh(sizes, MESH_AXES, axis_types=AXIS_TYPES, devices=devices)
    if sizes[0] % slices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: the devices span {slices} TPU slices and the "
                         f"'data' axis (the one across slices) must be a multiple of {slices}")
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_hybrid_device_mesh((sizes[0] // slices, *sizes[1:]), (slices, 1, 1), devices)
    return Mesh(grid, MESH_AXES, axis_types=AXIS_TYPES)

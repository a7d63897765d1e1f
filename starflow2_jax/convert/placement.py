"""Placing converted parameters on devices one tensor at a time (streaming import of big checkpoints).

``ParamSink`` receives a parameter whole, or one layer of a layer-stacked (num_layers, …)
parameter, and sends it to its devices at once: a stacked parameter is pre-allocated on the
devices with its final sharding and filled layer by layer (an in-place, donated update), so the
host never holds more than the tensor being converted and the devices never hold more than the
finished parameters. Works on any ``jax.sharding.Sharding`` (a ``NamedSharding`` over a mesh, a
``SingleDeviceSharding``) and with several processes (``jax.make_array_from_callback``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

Path = tuple[str, ...]


def _layer_sharding(sharding: jax.sharding.Sharding, ndim: int) -> jax.sharding.Sharding:
    """The sharding of one layer (leading axis dropped) of a stacked array sharded by ``sharding``."""
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
        return NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))
    return sharding


def _put(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


# Cached per sharding (jit then caches per shape), so loading a second model of the same family
# compiles nothing new.
@functools.lru_cache(maxsize=None)
def _zeros(shape: tuple[int, ...], dtype: np.dtype, sharding: jax.sharding.Sharding):
    return jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _layer_writer(sharding: jax.sharding.Sharding):
    """Jitted, donated ``buf[i] = x`` keeping ``buf``'s sharding."""
    return jax.jit(lambda buf, x, i: jax.lax.dynamic_update_index_in_dim(buf, x, i, 0),
                   donate_argnums=0, out_shardings=sharding)


class ParamSink:
    """Collects a params tree leaf by leaf (or layer by layer) directly on its devices.

    abstract: tree of ``jax.ShapeDtypeStruct`` (the unboxed params' shapes); shardings: the same
    tree of ``Sharding``; dtype: the stored dtype of every floating parameter.
    """

    def __init__(self, abstract, shardings, dtype):
        self.dtype = np.dtype(dtype)
        self._leaves: dict[Path, tuple[tuple[int, ...], jax.sharding.Sharding]] = {}
        flat_shapes = jax.tree_util.tree_flatten_with_path(abstract)[0]
        flat_shardings = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
        if len(flat_shapes) != len(flat_shardings):
            raise ValueError(f"{len(flat_shapes)} parameters but {len(flat_shardings)} shardings")
        for (keypath, leaf), sharding in zip(flat_shapes, flat_shardings):
            path = tuple(str(getattr(k, "key", k)) for k in keypath)
            self._leaves[path] = (tuple(leaf.shape), sharding)
        self._treedef = jax.tree_util.tree_structure(abstract)
        self._done: dict[Path, jax.Array] = {}
        self._filling: dict[Path, tuple[jax.Array, set[int]]] = {}

    def put(self, path: Path, value: np.ndarray, layer: int | None = None) -> None:
        """Places ``value`` as the parameter ``path`` (``layer`` None) or as layer ``layer`` of it."""
        if path not in self._leaves:
            raise KeyError(f"no parameter {'/'.join(path)} in the model (known: {len(self._leaves)} parameters)")
        shape, sharding = self._leaves[path]
        expected = shape if layer is None else shape[1:]
        if tuple(value.shape) != expected:
            where = "/".join(path) + ("" if layer is None else f" layer {layer}")
            raise ValueError(f"{where}: value of shape {tuple(value.shape)}, expected {expected}")
        value = np.ascontiguousarray(value, self.dtype)
        if layer is None:
            self._done[path] = _put(value, sharding)
            return
        if not 0 <= layer < shape[0]:
            raise ValueError(f"{'/'.join(path)}: layer {layer} out of range for {shape[0]} layers")
        if path not in self._filling:
            self._filling[path] = (_zeros(shape, self.dtype, sharding)(), set())
        buf, layers = self._filling[path]
        slice_ = _put(value, _layer_sharding(sharding, len(shape)))
        buf = _layer_writer(sharding)(buf, slice_, np.int32(layer))
        layers.add(layer)
        if len(layers) == shape[0]:
            self._done[path] = buf
            del self._filling[path]
        else:
            self._filling[path] = (buf, layers)

    def missing(self) -> list[str]:
        """Parameters (and layers) not received yet, as 'path' or 'path[layers]' strings."""
        out = []
        for path, (shape, _) in self._leaves.items():
            if path in self._done:
                continue
            got = self._filling.get(path, (None, set()))[1]
            todo = [i for i in range(shape[0]) if i not in got] if got else None
            out.append("/".join(path) + (f" layers {todo}" if todo else ""))
        return out

    def finish(self):
        """The params tree; raises ValueError listing every parameter (or layer) never received."""
        missing = self.missing()
        if missing:
            raise ValueError(f"{len(missing)} parameter(s) were never filled: {missing}")
        return jax.tree_util.tree_unflatten(self._treedef, [self._done[path] for path in self._leaves])

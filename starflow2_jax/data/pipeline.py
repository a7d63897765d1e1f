"""grain input pipelines over TFDS data sources: shuffle, preprocess, shard by JAX process, [pack,] batch, repeat.

Order of operations (``make_pipeline``)::

    MapDataset.source(src).seed(seed) → shuffle → random_map(preprocess)
      → [:full global batches] (drop_remainder) or padding to them (pad_remainder)
      → [process_index::process_count] → batch(per-process batch) → repeat(num_epochs)
      → to_iter_dataset(ReadOptions) [→ mp_prefetch(worker_count)]

Shuffling and the random preprocessing happen on the *global* stream, before sharding, so the
global order and every random value depend only on the seed: they are the same for any number of
processes, and the processes' shards are disjoint slices of it. Each epoch is reshuffled (grain
derives the epoch's permutation from seed + epoch). Iterators support ``get_state()`` /
``set_state()`` and resume exactly, random values included.

A batch is a dict of numpy arrays, ``B`` = the per-process batch (global // process_count)::

    image    float32 (B, H, W, C)   in [-1, 1] plus the configured noise
    label    int32   (B,)           -1 = dropped (unconditional) or unlabelled
    caption  str_    (B,)           numpy unicode array ('<U{longest}'); "" = dropped or none
    index    int64   (B,)           the example's ``index`` feature (-1 for padding)
    valid    bool    (B,)           only with pad_remainder=True: False marks padding examples
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from starflow2_jax.data.packing import PackIterDataset, PackingSpec

Preprocess = Callable[[Mapping[str, Any], np.random.Generator], Mapping[str, Any]]


class _PadToMultiple(grain.MapDataset):
    """``parent`` followed by copies of ``padding`` up to a multiple of ``multiple``, epoch by epoch."""

    def __init__(self, parent: grain.MapDataset, multiple: int, padding: Mapping[str, Any]):
        super().__init__(parent)
        self._parent_length = len(parent)
        self._length = math.ceil(self._parent_length / multiple) * multiple
        self._padding = dict(padding)

    def __len__(self) -> int:
        return self._length

    def __str__(self) -> str:
        return f"_PadToMultiple(length={self._length})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, offset = divmod(index, self._length)
        if offset < self._parent_length:
            return self._parent[epoch * self._parent_length + offset]
        return dict(self._padding)


def _mark_valid(example: Mapping[str, Any]) -> dict[str, Any]:
    return {**example, "valid": np.bool_(True)}


def _padding_like(example: Mapping[str, Any]) -> dict[str, Any]:
    """A padding example with ``example``'s structure: zeros, label/index -1, caption "", valid False."""
    padding = {}
    for key, value in example.items():
        if isinstance(value, (str, bytes)):
            padding[key] = type(value)()
        else:
            padding[key] = np.zeros_like(value)
    for key in ("label", "index"):
        if key in padding:
            padding[key] = np.full_like(padding[key], -1)
    padding["valid"] = np.bool_(False)
    return padding


def _check_int(name: str, value: Any, minimum: int, caller: str = "make_pipeline") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{caller}: {name} {value!r}; expected an int >= {minimum}")
    return int(value)


def _check_common(caller, batch_size, seed, num_epochs, process_index, process_count, worker_count):
    """The checked ``(batch_size, seed, num_epochs, process_index, process_count, worker_count)``."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    batch_size = _check_int("batch_size", batch_size, 1, caller)
    process_count = _check_int("process_count", process_count, 1, caller)
    process_index = _check_int("process_index", process_index, 0, caller)
    worker_count = _check_int("worker_count", worker_count, 0, caller)
    if process_index >= process_count:
        raise ValueError(f"{caller}: process_index {process_index}; expected < process_count {process_count}")
    if batch_size % process_count:
        raise ValueError(f"{caller}: global batch_size {batch_size} is not divisible by process_count {process_count}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"{caller}: seed {seed!r}; expected an int in [0, 2**32)")
    if num_epochs is not None:
        num_epochs = _check_int("num_epochs", num_epochs, 1, caller)
    return batch_size, int(seed), num_epochs, process_index, process_count, worker_count


def make_pipeline(
    source: Sequence[Mapping[str, Any]],
    *,
    batch_size: int,
    seed: int,
    shuffle: bool,
    preprocess: Preprocess,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = True,
    pad_remainder: bool = False,
    worker_count: int = 0,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """The grain ``IterDataset`` of this process's batches of ``source`` (see the module doc for the format).

    Args:
      source: a random-access data source (``len`` + ``__getitem__``), e.g.
        ``builder.as_data_source('train')`` or ``tfds.data_source(...)``.
      batch_size: the *global* batch size; each process gets ``batch_size // process_count`` per batch.
      seed: pipeline seed in ``[0, 2**32)``; shuffle and preprocessing derive their seeds from it.
      shuffle: reshuffle the whole split each epoch.
      preprocess: ``f(example, rng) -> example`` (e.g. ``ImagePreprocess``); ``rng`` is seeded per
        (seed, epoch, position) by ``grain.MapDataset.random_map``, use only it for randomness.
      num_epochs: passes over the data; None repeats forever.
      process_index, process_count: this process's shard; default ``jax.process_index()/process_count()``.
      drop_remainder: keep only full global batches (every process then gets the same number of
        full batches per epoch; the dropped examples differ from epoch to epoch when shuffling).
      pad_remainder: instead pad the last global batch with zero examples marked ``valid=False``
        (for evaluation over every example; needs drop_remainder=False). With neither, the last
        batches are short and processes may get different numbers of batches.
      worker_count: > 0 adds ``mp_prefetch`` with that many worker processes.
      read_options: grain ``ReadOptions`` for the reading threads (default grain's).
    Returns:
      a ``grain.IterDataset``; ``iter()`` it and use ``get_state()/set_state()`` to checkpoint.
    """
    batch_size, seed, num_epochs, process_index, process_count, worker_count = _check_common(
        "make_pipeline", batch_size, seed, num_epochs, process_index, process_count, worker_count)
    if drop_remainder and pad_remainder:
        raise ValueError("make_pipeline: drop_remainder=True and pad_remainder=True exclude each other; "
                         "pass drop_remainder=False to pad")
    if not callable(preprocess):
        raise ValueError(f"make_pipeline: preprocess {preprocess!r} is not callable")
    length = len(source)
    if length == 0:
        raise ValueError("make_pipeline: the data source is empty")
    if drop_remainder and length < batch_size:
        raise ValueError(f"make_pipeline: the data source has {length} examples, fewer than one global batch "
                         f"of {batch_size} (drop_remainder=True would yield nothing)")

    dataset = grain.MapDataset.source(source).seed(int(seed))
    if shuffle:
        dataset = dataset.shuffle()
    dataset = dataset.random_map(preprocess)
    if drop_remainder:
        dataset = dataset[: length // batch_size * batch_size]
    elif pad_remainder:
        dataset = dataset.map(_mark_valid)
        dataset = _PadToMultiple(dataset, batch_size, _padding_like(dataset[0]))
    dataset = dataset[process_index::process_count]
    dataset = dataset.batch(batch_size // process_count, drop_remainder=False)
    dataset = dataset.repeat(num_epochs)
    iter_dataset = dataset.to_iter_dataset(read_options or grain.ReadOptions())
    if worker_count > 0:
        iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter_dataset


def make_packed_pipeline(
    source: Sequence[Mapping[str, Any]],
    *,
    spec: PackingSpec,
    batch_size: int,
    seed: int,
    shuffle: bool,
    preprocess: Preprocess,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = True,
    worker_count: int = 0,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """The grain ``IterDataset`` of this process's batches of packed rows of ``source``'s documents.

    ``MapDataset.source(src).seed(seed) → shuffle → random_map(preprocess) → [process_index::process_count]
    → repeat(num_epochs) → to_iter_dataset [→ mp_prefetch] → pack(spec)
    → batch(batch_size // process_count)``.

    ``preprocess(example, rng)`` must return a document for ``data.packing`` (a dict of numpy
    arrays with ``spec``'s fields), e.g. the model's sequence layout applied to
    ``DocumentPreprocess``'s output. Each process packs its own shard of the documents, so the rows
    (unlike ``make_pipeline``'s batches) depend on the number of processes; every document of an
    epoch still goes to exactly one process. A batch is the stacked rows: each field of
    ``data.packing``'s row with a leading axis ``batch_size // process_count``. Rows run across
    epoch boundaries; with ``num_epochs`` set, the last rows are emitted when the documents run out
    and ``drop_remainder`` drops a last, short batch. ``worker_count`` > 0 runs the preprocessing
    (decoding, layout) in worker processes; the packing stays in this process, so the rows are the
    same for any ``worker_count``. Other arguments as ``make_pipeline``; ``get_state()/set_state()``
    on the iterator resume exactly.
    """
    caller = "make_packed_pipeline"
    batch_size, seed, num_epochs, process_index, process_count, worker_count = _check_common(
        caller, batch_size, seed, num_epochs, process_index, process_count, worker_count)
    if not isinstance(spec, PackingSpec):
        raise ValueError(f"{caller}: spec {spec!r}; expected a data.packing.PackingSpec")
    if not callable(preprocess):
        raise ValueError(f"{caller}: preprocess {preprocess!r} is not callable")
    length = len(source)
    if length < process_count:
        raise ValueError(f"{caller}: the data source has {length} documents, fewer than the {process_count} "
                         "processes (some would get none)")

    dataset = grain.MapDataset.source(source).seed(seed)
    if shuffle:
        dataset = dataset.shuffle()
    dataset = dataset.random_map(preprocess)[process_index::process_count].repeat(num_epochs)
    documents = dataset.to_iter_dataset(read_options or grain.ReadOptions())
    if worker_count > 0:  # workers preprocess documents; packing stays in this process, so rows do not
        documents = documents.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))  # depend on it
    return PackIterDataset(documents, spec).batch(batch_size // process_count, drop_remainder=drop_remainder)

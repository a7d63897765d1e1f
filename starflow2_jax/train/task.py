"""The ``Task`` protocol: what the training loop needs from a model family.

One loop (``train.loop.train``) serves every model family (``train.families``): flows
(``tasks.flow.FlowTask``), the FAE stages (``tasks.fae.FAETask``), STARFlow2 next. A task owns its parameters' layout, its host-side batch preparation, its loss and
its periodic outputs; the loop owns the mesh, optimiser, state, checkpoints, data and logging.

Conventions:
- ``params`` are the *trainable* parameters (a plain pytree), ``extra_vars`` the non-trainable
  collections (e.g. ``{'prior': ...}``); both float32. ``params`` and ``extra_vars`` are
  checkpointed, except the top-level ``extra_vars`` entries that are the family's frozen parts
  (``train.frozen``): those are loaded from their sources at every start and never saved with a step.
- ``init`` returns params still boxed (``nn.Partitioned`` with logical axis names) so the loop can
  derive shardings with ``jax.eval_shape`` and the task's ``rules``; ``extra_vars`` are unboxed
  (replicated).
- ``loss`` and ``eval_step`` are traced inside the loop's ``jax.jit`` (with the mesh and ``rules``
  active) on batches produced by ``prepare_batch`` and sharded over ``('data', 'fsdp')``.
- ``extra_vars`` may also be boxed; they are then sharded by ``rules`` like parameters (e.g. a frozen
  pretrained encoder).

Optional hooks: attributes every task has (``TaskBase`` sets them to None); the loop calls a hook
when it is not None (``FAETask`` sets both):
- ``trainable(params) -> tree of labels``: False freezes a leaf (no optimiser state, no update, no
  EMA); other labels are update groups with their own clip + AdamW (``train.optim.make_optimizer``).
- ``finalize(params, extra_vars, batches) -> extra_vars``: after the schedule's last step, before
  the final checkpoint (e.g. statistics computed once from the trained model and stored with it).
- ``example_batch(batch_size) -> batch``: a zero batch in the data pipeline's format (what
  ``prepare_batch`` takes), for ahead-of-time compilation (``starflow2 aot``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Protocol, runtime_checkable

import jax
import numpy as np

Batch = Mapping[str, Any]


class SampleGrid(NamedTuple):
    """images (rows, cols, H, W, C) in [−1, 1]; row_names: one caption per row ('3', 'a digit …')."""

    images: Any
    row_names: list


@runtime_checkable
class Task(Protocol):
    """See the module docstring. ``rules``: the logical-axis rules table for ``init``'s names."""

    rules: tuple
    trainable: Optional[Callable[[Any], Any]]
    finalize: Optional[Callable[[Any, Any, Iterator], Any]]

    def init(self, rng: jax.Array) -> tuple[Any, Any]:
        """``(boxed trainable params, extra_vars)`` for a fresh model (jit-able)."""

    def prepare_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host side, per step: the data pipeline's numpy batch → the numeric arrays ``loss`` reads
        (strings tokenised, unused fields dropped). Every leaf keeps the batch as its leading axis."""

    def loss(self, params, extra_vars, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``(scalar loss to minimise, {name: scalar metric}}`` for one (micro-)batch."""

    def eval_step(self, params, extra_vars, batch: Batch, rng: jax.Array) -> dict[str, jax.Array]:
        """Per-example evaluation metrics ``{name: (B,)}`` (e.g. 'bits_per_dim')."""

    def sample_grid(self, params, extra_vars, rng: jax.Array, *, guidance: float) -> SampleGrid:
        """A grid of samples at classifier-free guidance weight ``guidance`` (for periodic images)."""


class TaskBase:
    """A base for tasks: declares the optional hooks as absent (override them with methods)."""

    trainable: Optional[Callable[[Any], Any]] = None
    finalize: Optional[Callable[[Any, Any, Iterator], Any]] = None
    example_batch: Optional[Callable[[int], Any]] = None

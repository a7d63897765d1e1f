"""The ``Task`` protocol: what the training loop needs from a model family.

One loop (``train.loop.train``) serves every model: flows now (``tasks.flow.FlowTask``), FAE and
STARFlow2 later. A task owns its parameters' layout, its host-side batch preparation, its loss and
its periodic outputs; the loop owns the mesh, optimiser, state, checkpoints, data and logging.

Conventions:
- ``params`` are the *trainable* parameters (a plain pytree), ``extra_vars`` the non-trainable
  collections (e.g. ``{'prior': ...}``); both float32, both checkpointed.
- ``init`` returns params still boxed (``nn.Partitioned`` with logical axis names) so the loop can
  derive shardings with ``jax.eval_shape`` and the task's ``rules``; ``extra_vars`` are unboxed
  (replicated).
- ``loss`` and ``eval_step`` are traced inside the loop's ``jax.jit`` (with the mesh and ``rules``
  active) on batches produced by ``prepare_batch`` and sharded over ``('data', 'fsdp')``.
- ``extra_vars`` may also be boxed; they are then sharded by ``rules`` like parameters (e.g. a frozen
  pretrained encoder).

Optional hooks the loop calls when a task has them (``FAETask`` uses all three):
- ``trainable(params) -> tree of labels``: False freezes a leaf (no optimiser state, no update);
  other labels are update groups with their own clip + AdamW (``train.optim.make_optimizer``).
- ``load_frozen(extra_vars, extra_shardings) -> extra_vars``: at a fresh start (not on resume, not
  with ``train.init_from``), replaces initialised frozen variables with pretrained ones.
- ``finalize(params, extra_vars, batches) -> extra_vars``: after the schedule's last step, before
  the final checkpoint (e.g. statistics computed once from the trained model and stored with it).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Protocol, runtime_checkable

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

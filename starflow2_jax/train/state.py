"""The train state: everything the optimiser changes, as one pytree (checkpointed as one item).

Only trainable parameters live here. Non-trainable collections (the flow's 'prior' buffer, later
frozen encoders) travel beside it as ``extra_vars`` and are checkpointed as their own item, so they
never get optimiser moments or gradients.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """step: optimiser steps attempted (skipped ones included) — also the data position;
    params: trainable parameters; opt_state: the optax state; ema_params: EMA of params (None
    when off); rng: raw uint32 PRNG key data (2,) the step rngs fold the step into;
    skipped_steps: total steps whose update was rejected as non-finite; nonfinite_streak: how
    many of the most recent steps in a row were non-finite (0 after a good step)."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array
    skipped_steps: jax.Array
    nonfinite_streak: jax.Array

    @classmethod
    def create(cls, params, optimizer: optax.GradientTransformation, rng: jax.Array, *,
               ema: bool = False, trainable=None) -> "TrainState":
        """Step 0 state for ``params`` (works on boxed params too, so ``jax.eval_shape`` of it keeps
        the logical axis names that shardings are derived from). ``rng``: raw uint32 key data (2,).
        ``trainable``: the task's labels for ``params`` (None: every leaf trains), for the EMA."""
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                   ema_params=ema_copy(params, trainable) if ema else None,
                   rng=jnp.asarray(rng, jnp.uint32), skipped_steps=jnp.zeros((), jnp.int32),
                   nonfinite_streak=jnp.zeros((), jnp.int32))

    def step_rng(self) -> jax.Array:
        """A typed PRNG key for this step: ``fold_in(key(rng), step)``."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def _is_box(x) -> bool:
    return isinstance(x, nn.Partitioned)


def ema_copy(params, trainable=None):
    """A copy of ``params`` for the EMA with None at every leaf ``trainable`` labels False (a frozen
    leaf needs no average); every leaf without labels. Works on boxed params (a frozen box → None)."""
    if trainable is None:
        return jax.tree.map(jnp.copy, params)

    def copy(p, label):
        label = label.value if _is_box(label) else label
        return None if label is False else jax.tree.map(jnp.copy, p)

    return jax.tree.map(copy, params, trainable, is_leaf=_is_box)


def ema_update(ema, params, decay: float, ok: jax.Array):
    """``decay·ema + (1 − decay)·params`` on the EMA's leaves (None ones stay None) when ``ok``."""
    return jax.tree.map(lambda e, p: None if e is None else jnp.where(ok, decay * e + (1.0 - decay) * p, e),
                        ema, params, is_leaf=lambda x: x is None)


def tree_all_finite(tree) -> jax.Array:
    """One boolean scalar: every floating leaf of ``tree`` is finite (True for an empty tree)."""
    flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


@jax.jit
def state_is_finite(state: TrainState) -> jax.Array:
    """True when params, optimiser state and EMA are all finite (one device scalar, jitted)."""
    return tree_all_finite((state.params, state.opt_state, state.ema_params))

"""Sharded state creation and the jitted train / eval steps.

Shardings come from ``jax.eval_shape`` of the whole boxed train state (params, optimiser moments and
EMA keep the params' logical axis names; counters and the rng are replicated) and the task's rules;
the state is then created directly in that layout by a jitted init with ``out_shardings``. The train
step is one ``jax.jit`` with explicit in/out shardings and the state donated; it is traced inside
``parallel.activation_rules`` so the models' activation constraints apply.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from starflow2_jax import parallel
from starflow2_jax.parallel import BATCH_AXES
from starflow2_jax.train.optim import guarded_update, learning_rate_schedule
from starflow2_jax.train.state import TrainState, ema_update
from starflow2_jax.train.task import Task


class StateShardings(NamedTuple):
    """``NamedSharding`` trees for the train state and the task's extra vars, plus their abstract
    (unboxed ``ShapeDtypeStruct``) shapes."""

    state: Any
    extra: Any
    abstract_state: Any
    abstract_extra: Any


class ModelShardings(NamedTuple):
    """``NamedSharding`` trees of a task's params and extra vars, plus their abstract shapes (what a
    restore for sampling or evaluation needs: no optimiser)."""

    params: Any
    extra: Any
    abstract_params: Any
    abstract_extra: Any


def _boxed_init(task: Task, optimizer: optax.GradientTransformation, ema: bool, rng: jax.Array):
    k_model, k_state = jax.random.split(rng)
    params, extra = task.init(k_model)
    trainable = task.trainable(params) if task.trainable is not None else None
    return TrainState.create(params, optimizer, jax.random.key_data(k_state), ema=ema, trainable=trainable), extra


def model_shardings(task: Task, mesh: Mesh) -> ModelShardings:
    """Shardings and abstract shapes of ``task.init``'s ``(params, extra_vars)`` on ``mesh`` (no memory
    touched, no optimiser)."""
    boxed = jax.eval_shape(lambda key: task.init(jax.random.split(key)[0]), jax.random.key(0))
    shardings = parallel.logical_shardings(boxed, mesh, task.rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            nn.meta.unbox(boxed), shardings)
    return ModelShardings(params=shardings[0], extra=shardings[1], abstract_params=abstract[0],
                          abstract_extra=abstract[1])


def state_shardings(task: Task, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                    ema: bool) -> StateShardings:
    """Shardings and abstract shapes of ``(TrainState, extra_vars)`` on ``mesh`` (no memory touched)."""
    boxed = jax.eval_shape(functools.partial(_boxed_init, task, optimizer, ema), jax.random.key(0))
    shardings = parallel.logical_shardings(boxed, mesh, task.rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            nn.meta.unbox(boxed), shardings)
    return StateShardings(state=shardings[0], extra=shardings[1], abstract_state=abstract[0],
                          abstract_extra=abstract[1])


def create_state(task: Task, optimizer: optax.GradientTransformation, shardings: StateShardings,
                 rng: jax.Array, *, ema: bool, skip_extra: tuple[str, ...] = ()) -> tuple[TrainState, Any]:
    """A fresh ``(TrainState, extra_vars)`` created directly with ``shardings`` (typed key ``rng``).

    ``skip_extra``: top-level extra entries not to initialise (frozen parts, loaded instead): they are
    absent from the returned extra vars, and never materialised."""

    def fresh(key):
        state, extra = nn.meta.unbox(_boxed_init(task, optimizer, ema, key))
        return state, {k: v for k, v in extra.items() if k not in skip_extra}

    extra_shardings = {k: v for k, v in shardings.extra.items() if k not in skip_extra}
    return jax.jit(fresh, out_shardings=(shardings.state, extra_shardings))(rng)


def _micro_batches(batch, accum: int, mesh: Mesh):
    """(B, …) leaves → (accum, B/accum, …); micro-batch j holds rows j, j+accum, … so every device's
    slice of the batch splits locally (no communication)."""
    spec = NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))

    def split(x):
        if x.shape[0] % accum:
            raise ValueError(f"batch of {x.shape[0]} rows is not divisible by train.grad_accum={accum}")
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, spec)

    return jax.tree.map(split, batch)


def make_train_step(task: Task, optimizer: optax.GradientTransformation, mesh: Mesh,
                    shardings: StateShardings, config) -> Callable:
    """``step(state, extra_vars, batch) -> (state, metrics)``: one jitted, sharded optimiser step.

    ``batch``: ``task.prepare_batch`` output, sharded by ``parallel.shard_batch``. Gradients are
    averaged over ``config.train.grad_accum`` micro-batches (``lax.scan``); a step whose loss,
    gradients or updated state is non-finite is rejected (params/opt state unchanged, counted in
    ``skipped_steps`` / ``nonfinite_streak``). EMA (``config.optim.ema_decay`` > 0) follows applied
    updates. ``metrics``: the task's scalars plus grad_norm, lr, update_ok, skipped_steps,
    nonfinite_streak (replicated scalars). The state argument is donated. ``step.jitted`` is the
    bare ``jax.jit`` (for ``.lower(...)``/AOT compilation: lower it inside
    ``parallel.activation_rules(mesh, task.rules)``).
    """
    accum = int(config.train.grad_accum)
    ema_decay = float(config.optim.ema_decay)
    schedule = learning_rate_schedule(config.optim, int(config.train.steps))
    grad_fn = jax.value_and_grad(task.loss, has_aux=True)

    def compute_grads(params, extra, batch, rng):
        if accum == 1:
            (loss, metrics), grads = grad_fn(params, extra, batch, rng)
            return loss, metrics, grads
        micro = _micro_batches(batch, accum, mesh)

        def body(carry, inputs):
            index, mb = inputs
            (loss, metrics), grads = grad_fn(params, extra, mb, jax.random.fold_in(rng, index))
            return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

        shapes = jax.eval_shape(lambda: grad_fn(params, extra, jax.tree.map(lambda x: x[0], micro), rng))
        (loss0, metrics0), grads0 = shapes
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss0, metrics0, grads0))
        total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
        return jax.tree.map(lambda x: x / accum, total)

    def train_step(state: TrainState, extra, batch):
        loss, metrics, grads = compute_grads(state.params, extra, batch, state.step_rng())
        params, opt_state, ok = guarded_update(optimizer, grads, state.opt_state, state.params,
                                               jnp.isfinite(loss))
        ema = state.ema_params
        if ema is not None:
            ema = ema_update(ema, params, ema_decay, ok)
        bad = jnp.logical_not(ok).astype(jnp.int32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                                  skipped_steps=state.skipped_steps + bad,
                                  nonfinite_streak=jnp.where(ok, 0, state.nonfinite_streak + 1))
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                       lr=schedule(state.step - state.skipped_steps), update_ok=ok,
                       skipped_steps=new_state.skipped_steps, nonfinite_streak=new_state.nonfinite_streak)
        return new_state, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))  # prefix: leading axis of every leaf
    jitted = jax.jit(train_step, in_shardings=(shardings.state, shardings.extra, batch_sharding),
                     out_shardings=(shardings.state, replicated), donate_argnums=0)

    def step(state, extra, batch):
        with parallel.activation_rules(mesh, task.rules):
            return jitted(state, extra, batch)

    step.jitted = jitted
    return step


def make_eval_step(task: Task, mesh: Mesh, shardings: ModelShardings | StateShardings) -> Callable:
    """``eval(params, extra_vars, batch, rng) -> {name: (B,)}``, jitted with the params' shardings
    and the batch split over ``('data', 'fsdp')``."""
    batch_sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    params = shardings.params if isinstance(shardings, ModelShardings) else shardings.state.params
    jitted = jax.jit(task.eval_step, in_shardings=(params, shardings.extra, batch_sharding, None),
                     out_shardings=batch_sharding)

    def evaluate(params, extra, batch, rng):
        with parallel.activation_rules(mesh, task.rules):
            return jitted(params, extra, batch, rng)

    return evaluate

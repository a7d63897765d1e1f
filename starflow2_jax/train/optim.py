"""The optimiser: global-norm clip → AdamW (masked weight decay) with warm-up + cosine-to-floor LR,
and the guard that rejects non-finite updates.

Weight-decay rule: only leaves named ``kernel`` decay — the weight matrices of every dense and
attention projection (their scanned stacks too). Biases, norm scales/biases, and every embedding or
learned vector (``pos_embed``, ``class_embed``, ``sos_embed``, the caption ``embedding`` table) are
excluded. A rank rule ("≥ 2-D") would not work here: ``nn.scan`` stacks layers, so a LayerNorm scale
becomes (layers, D) and an embedding table is 2-D as well.

Schedule: ``lr(t) = peak·t/W`` for t < W (warm-up from 0), then
``min_lr + (peak − min_lr)·½(1 + cos(π·(t − W)/(S − W)))`` up to S = train.steps, and ``min_lr``
after; t counts *applied* updates (a rejected non-finite step does not advance it).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from starflow2_jax.train.state import tree_all_finite


def _leaf_name(path) -> str:
    """The last dict key on a pytree path (skips the ``.value`` of ``nn.Partitioned`` boxes)."""
    for key in reversed(path):
        if isinstance(key, jax.tree_util.DictKey):
            return str(key.key)
    return ""


def decay_mask(params) -> Any:
    """A tree of bools like ``params``: True where weight decay applies (leaves named 'kernel')."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) == "kernel", params)


def learning_rate_schedule(optim, total_steps: int) -> optax.Schedule:
    """Linear warm-up 0 → ``optim.lr`` over ``optim.warmup_steps``, cosine to ``optim.min_lr`` at
    ``total_steps`` (constant after). See the module docstring for the formula."""
    warmup = int(optim.warmup_steps)
    if total_steps < max(warmup, 1):
        raise ValueError(f"train.steps={total_steps} must be >= max(optim.warmup_steps={warmup}, 1)")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=float(optim.lr), warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=float(optim.min_lr))


def make_optimizer(optim, total_steps: int, *, trainable: Callable[[Any], Any] | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(clip → AdamW(β1, β2, eps, masked decay, schedule), schedule)`` from ``config.optim``.

    ``trainable``: optional ``params -> tree of labels`` (a task's ``trainable``): ``False`` marks a
    frozen leaf (no optimiser state, zero update); any other label names an update group that gets
    its own clip → AdamW chain, so groups never share a gradient-norm clip (e.g. an auto-encoder and
    its GAN discriminator trained in the same step). ``True`` is one group.
    """
    schedule = learning_rate_schedule(optim, total_steps)

    def chain() -> optax.GradientTransformation:
        parts = []
        if optim.clip_norm > 0:
            parts.append(optax.clip_by_global_norm(float(optim.clip_norm)))
        parts.append(optax.adamw(schedule, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
                                 weight_decay=float(optim.weight_decay), mask=decay_mask))
        return optax.chain(*parts)

    if trainable is None:
        return chain(), schedule

    def labels(params):
        return jax.tree.map(lambda t: "frozen" if t is False else f"group:{t}", trainable(params))

    def transforms(params) -> dict:
        groups = sorted(set(jax.tree.leaves(labels(params))) - {"frozen"})
        return {"frozen": optax.set_to_zero(), **{g: chain() for g in groups}}

    # the groups are read off the params (init and update both get them; update must be given params)
    def init(params):
        return optax.multi_transform(transforms(params), labels).init(params)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("this optimiser groups parameters by the task's trainable labels: pass params to update")
        return optax.multi_transform(transforms(params), labels).update(updates, state, params)

    return optax.GradientTransformation(init, update), schedule


def guarded_update(optimizer: optax.GradientTransformation, grads, opt_state, params,
                   extra_finite: jax.Array | bool = True) -> tuple[Any, Any, jax.Array]:
    """One optimiser update that is *rejected* unless everything stays finite.

    Applies ``optimizer`` to ``grads``; the update is kept only when ``grads``, the new params and
    the new optimiser state are all finite and ``extra_finite`` (e.g. the loss) holds. Returns
    ``(params, opt_state, ok)`` — the old params and state when rejected, ``ok`` a bool scalar.
    """
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    ok = jnp.logical_and(jnp.asarray(extra_finite),
                         tree_all_finite((grads, new_params, new_opt_state)))
    keep: Callable = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    return keep(new_params, params), keep(new_opt_state, opt_state), ok

"""Shared by the tests of the flow's execution switches (``FlowConfig.scan_layers``, ``dense_2d``): each
builds a flow both ways and checks that the two agree."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def both_ways(base, field: str):
    """``(base with field=True, base with field=False)``, validated."""
    return (dataclasses.replace(base, **{field: True}).validate(),
            dataclasses.replace(base, **{field: False}).validate())


def flow_inputs(config, batch: int = 2):
    """``(images, cond, noise)`` for ``config``: random images, class labels or text features, and
    sampling noise."""
    h, w = config.image_size
    images = jax.random.normal(jax.random.PRNGKey(1), (batch, h, w, config.in_channels))
    if config.num_classes:
        cond = jnp.arange(batch) % config.num_classes
    else:
        cond = jax.random.normal(jax.random.PRNGKey(2), (batch, config.text_len, config.text_dim))
    noise = jax.random.normal(jax.random.PRNGKey(3), (batch, config.num_tokens, config.token_dim))
    return images, cond, noise


def assert_close(a, b, tol: float = 1e-5):
    """``a`` equals ``b`` to ``tol``, relative, or absolute against ``b``'s largest magnitude."""
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.max(np.abs(b)))))

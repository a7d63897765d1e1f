"""Shared pieces of the Pretzel tests: tiny configs, random params with every zero-initialised part
perturbed (so the deep head, the shallow heads and the bridges all act), and random documents."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from starflow2_jax import vlm
from starflow2_jax.pretzel import config as pconfig
from starflow2_jax.pretzel import layout
from starflow2_jax.pretzel import losses
from starflow2_jax.pretzel import model as pmodel

# jitted once per config for the whole test session
lm_logits = jax.jit(pmodel.lm_logits, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("train",))
def _per_example(config, params, vlm_params, batch, rng=None, train=False):
    return losses.per_example(config, params, vlm_params, batch, rng=rng, train=train)


def per_example(config, params, batch, rng=None, train=False):
    """losses.per_example on a numpy batch, with the session's tiny VLM."""
    return _per_example(config, params, vlm_params(), jnp_batch(batch), rng=rng, train=train)


@functools.lru_cache(maxsize=None)
def tiny(**overrides):
    return pconfig.tiny(**overrides)


STAGE1 = dict(adapter=False, vlm_to_flow=False, flow_to_lm=False)


def perturb(params, seed: int, scale: float = 0.05):
    """Every leaf plus scale·N(0, 1) noise (zero-initialised projections become active)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def _cached_concrete(fn):
    """lru_cache that always stores concrete arrays: a first call from inside a jit trace would
    otherwise cache that trace's tracers and poison every later test."""
    @functools.lru_cache(maxsize=None)
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with jax.ensure_compile_time_eval():
            return fn(*args, **kwargs)
    return wrapper


@_cached_concrete
def vlm_params(seed: int = 1):
    return vlm.init_text(tiny().vlm, jax.random.key(seed))


@_cached_concrete
def active_params(seed: int = 0, **overrides):
    """Random trainable params of tiny(**overrides) with all zero-initialised parts perturbed."""
    return perturb(pmodel.init(tiny(**overrides), jax.random.key(seed)), seed + 100)


def image(rng):
    return rng.uniform(-1, 1, (8, 8, 1)).astype(np.float32)


def words(rng, n):
    return rng.integers(3, 240, n).tolist()


def batch_of(config, documents, length=None, max_images=None):
    """Documents packed into one row, as a batch of one (numpy)."""
    from pretzel_packing import pack_documents, stack_rows
    return stack_rows([pack_documents(config, documents, length, max_images)])


def interleaved_doc(config, seed=0):
    """text, image, text, image, text (both images generation targets)."""
    rng = np.random.default_rng(seed)
    return layout.layout_document(config, [words(rng, 3), image(rng), words(rng, 4), image(rng), words(rng, 2)])


def jnp_batch(batch):
    return {k: jnp.asarray(v) for k, v in batch.items()}

"""Properties of the flow that need no reference numbers: invertibility, the log-determinant against
an autodiff Jacobian, Jacobi(threshold 0) against sequential sampling, causality, and option coverage."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starflow2_jax import flow


def perturbed(config, seed=0, scale=None):
    """Random variables with every parameter nudged (proj_out starts at zero) — never the prior.

    TarFlow's σ = exp(a) is unbounded, so its nudge is smaller to keep the Jacobian well conditioned.
    """
    if scale is None:
        scale = 0.02 if config.scale_fn == "exp" else 0.05
    variables = flow.init(config, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed + 1)  # numpy: no per-shape PRNG kernels to compile
    params = jax.tree_util.tree_map(
        lambda x: x + scale * rng.standard_normal(x.shape).astype(np.float32), variables["params"])
    return dict(variables, params=params)


def cond_for(config, batch, seed=3):
    if config.num_classes:
        return jnp.arange(batch) % config.num_classes
    if any(b.text_conditioned for b in config.blocks):
        return jax.random.normal(jax.random.PRNGKey(seed), (batch, config.text_len, config.text_dim))
    return None


CONFIGS = {
    "tarflow": flow.tarflow_config(3, 16, 4, 64, 2, 2, num_classes=10),
    "tarflow-vp-uncond": flow.tarflow_config(2, 8, 2, 64, 2, 1, nvp=False),
    "starflow-text": flow.starflow_config(4, 8, 1, 64, layers_per_block=[1, 2], head_dim=32, txt_size=8, txt_dim=16),
    "starflow-options": flow.starflow_config(
        4, 8, 2, 64, layers_per_block=[1, 1, 2], head_dim=32, num_heads=4, num_kv_heads=2, top_block_channels=96,
        txt_size=4, txt_dim=8, use_swiglu=True, norm_type="rms_norm", use_qk_norm=True, use_post_norm=True,
        use_bias=False, seq_order="R2L"),
    "starflow-all-cond-no-sos": flow.starflow_config(4, 8, 1, 64, layers_per_block=[1, 1], head_dim=32, txt_size=4,
                                                     txt_dim=8, cond_top_only=False, sos=False,
                                                     use_softplus=False, soft_clip=0.0),
    "starflow-labels-deep-only": flow.starflow_config(1, 8, 2, 64, layers_per_block=[1, 1], head_dim=32,
                                                      num_classes=10),
    "starflow-uncond-2d-rope": flow.starflow_config(3, 8, 2, 64, layers_per_block=[1, 1], head_dim=32),
}


def images_for(config, batch, seed=7):
    h, w = config.image_size
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, h, w, config.in_channels))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_inverse_of_forward(name):
    config = CONFIGS[name]
    variables = perturbed(config)
    x = images_for(config, 2)
    cond = cond_for(config, 2)
    z, logdets = flow.forward(config, variables, x, cond)
    assert logdets.shape == (2, len(config.blocks))
    if config.nvp:
        assert float(jnp.abs(logdets).min()) > 1e-4  # non-trivial maps
    else:  # volume preserving: a ≡ 0, but the shifts still move the data
        assert float(jnp.abs(logdets).max()) == 0.0
        assert float(jnp.abs(z - flow.patchify(config, x)).max()) > 1e-2
    x_rec = flow.sample(config, variables, z, cond)
    assert float(jnp.abs(x_rec - x).max()) <= 1e-5


@pytest.mark.parametrize("name", ["tarflow", "starflow-options", "starflow-all-cond-no-sos"])
def test_logdet_matches_autodiff_jacobian(name):
    config = CONFIGS[name]
    config = dataclasses.replace(config, image_size=(4, 4) if config.patch_size == 1 else config.image_size)
    if name == "tarflow":  # keep D small: 8x8x1 image, patch 2 → D = 64
        config = flow.tarflow_config(1, 8, 2, 64, 2, 2, num_classes=10)
    variables = perturbed(config)
    x = images_for(config, 1)
    cond = cond_for(config, 1)

    def z_flat(x_flat):
        z, _ = flow.forward(config, variables, x_flat.reshape(x.shape), cond)
        return z.reshape(-1)

    jac = jax.jacfwd(z_flat)(x.reshape(-1))
    sign, logabsdet = np.linalg.slogdet(np.asarray(jac, np.float64))
    assert sign != 0
    _, logdets = flow.forward(config, variables, x, cond)
    assert abs(float(logdets.sum()) - logabsdet) <= 1e-4, (float(logdets.sum()), logabsdet)


@pytest.mark.parametrize("name, block_size", [(name, 5) for name in sorted(CONFIGS)] + [("starflow-text", 16)])
def test_jacobi_at_threshold_zero_equals_sequential(name, block_size):
    config = CONFIGS[name]
    variables = perturbed(config)
    noise = jax.random.normal(jax.random.PRNGKey(11), (2, config.num_tokens, config.token_dim))
    cond = cond_for(config, 2)
    kwargs = {}
    if config.num_classes or any(b.text_conditioned for b in config.blocks):
        kwargs["guidance"] = 1.5
        if any(b.text_conditioned for b in config.blocks):
            kwargs["uncond"] = jnp.zeros_like(cond)
    sequential = flow.sample(config, variables, noise, cond, **kwargs)
    jacobi = flow.sample(config, variables, noise, cond, jacobi=dict(block_size=block_size, threshold=0.0,
                                                                      max_iters=config.num_tokens), **kwargs)
    assert float(jnp.abs(jacobi - sequential).max()) <= 1e-5


def test_jacobi_stops_early_and_reports_iterations():
    config = CONFIGS["starflow-text"]
    variables = perturbed(config, scale=0.02)
    noise = jax.random.normal(jax.random.PRNGKey(1), (2, config.num_tokens, config.token_dim))
    cond = cond_for(config, 2)
    _, info = flow.sample(config, variables, noise, cond, return_info=True,
                          jacobi=dict(block_size=16, threshold=1e-2, max_iters=32))
    iterations = np.asarray(info["iterations"])
    chunks = config.num_tokens // 16
    assert iterations.shape == (len(config.blocks),)
    assert ((iterations >= chunks) & (iterations < config.num_tokens)).all(), iterations
    _, info = flow.sample(config, variables, noise, cond, return_info=True,
                          jacobi=dict(block_size=16, threshold=0.0, max_iters=3))
    assert (np.asarray(info["iterations"]) == 3 * chunks).all()


@pytest.mark.parametrize("name", ["tarflow", "starflow-text"])
def test_output_token_depends_only_on_earlier_tokens(name):
    """z at sequence position t of a block must not change when later tokens change (causality)."""
    config = CONFIGS[name]
    config = dataclasses.replace(config, blocks=config.blocks[:1])  # one block, identity or flip order
    variables = perturbed(config)
    x = images_for(config, 1)
    cond = cond_for(config, 1)
    tokens = flow.patchify(config, x)
    order = np.arange(config.num_tokens)
    if config.blocks[0].permutation == "flip":
        order = order[::-1]
    t = config.num_tokens // 2
    later = order[t + 1:]
    changed = tokens.at[:, later].add(1.0)
    z0 = flow.forward_tokens(config, variables, tokens, cond).z
    z1 = flow.forward_tokens(config, variables, changed, cond).z
    assert float(jnp.abs(z0[:, order[: t + 1]] - z1[:, order[: t + 1]]).max()) == 0.0
    assert float(jnp.abs(z0[:, later] - z1[:, later]).max()) > 1e-3


def test_guidance_changes_samples_and_zero_guidance_is_identity():
    config = CONFIGS["tarflow"]
    variables = perturbed(config)
    noise = jax.random.normal(jax.random.PRNGKey(5), (2, config.num_tokens, config.token_dim))
    labels = jnp.array([1, 2])
    base = flow.sample(config, variables, noise, labels)
    guided = flow.sample(config, variables, noise, labels, guidance=2.0)
    assert float(jnp.abs(guided - base).max()) > 1e-3
    # a label of -1 selects the mean class embedding, exactly what the unconditional branch uses
    uncond = flow.sample(config, variables, noise, jnp.array([-1, -1]))
    uncond_guided = flow.sample(config, variables, noise, jnp.array([-1, -1]), guidance=2.0)
    assert float(jnp.abs(uncond_guided - uncond).max()) <= 1e-5


def test_remat_and_bfloat16_run():
    config = dataclasses.replace(CONFIGS["starflow-text"], remat="dots")
    variables = perturbed(config)
    x = images_for(config, 2)
    cond = cond_for(config, 2)

    def loss_fn(params):
        out = flow.forward_with_intermediates(config, dict(variables, params=params), x, cond)
        return flow.loss(config, out)["loss"]

    base = jax.grad(lambda p: flow.loss(dataclasses.replace(config, remat="none"), flow.forward_with_intermediates(
        dataclasses.replace(config, remat="none"), dict(variables, params=p), x, cond))["loss"])(variables["params"])
    grads = jax.grad(loss_fn)(variables["params"])
    diff = jax.tree_util.tree_reduce(max, jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), grads, base))
    assert diff <= 1e-5
    bf16 = dataclasses.replace(CONFIGS["starflow-text"], dtype="bfloat16")
    z32, _ = flow.forward(CONFIGS["starflow-text"], variables, x, cond)
    z16, ld16 = flow.forward(bf16, variables, x, cond)
    assert z16.dtype == jnp.float32 and ld16.dtype == jnp.float32
    assert float(jnp.abs(z16 - z32).max()) < 0.1


def test_class_embedding_only_in_conditioned_blocks():
    config = CONFIGS["starflow-labels-deep-only"]
    variables = flow.init(config, jax.random.PRNGKey(0))
    assert "class_embed" not in variables["params"]["blocks_0"]
    assert variables["params"]["blocks_1"]["class_embed"].shape == (10, 64)

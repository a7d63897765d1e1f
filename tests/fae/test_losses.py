"""FAE losses and the PatchGAN discriminator against independent oracles: numpy loops, scipy
quadrature for the KL, torch's ``F.normalize`` for the perceptual distance, hand-computed numbers for
the GAN losses, and noise statistics for the stage-Ia augmentation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import integrate, stats

from starflow2_jax.fae.discriminator import PatchDiscriminator
from starflow2_jax.fae.losses import (
    adaptive_gan_weight,
    feature_distance,
    feature_reconstruction,
    gaussian_kl,
    hinge_discriminator,
    hinge_generator,
    lecam,
    noisy_features,
    pixel_reconstruction,
)


def rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def kl_by_quadrature(mu, logvar):
    """KL(N(mu, e^logvar) ‖ N(0, 1)) = ∫ q (log q − log p), integrated numerically."""
    q = stats.norm(mu, np.exp(0.5 * logvar))
    p = stats.norm(0.0, 1.0)
    value, _ = integrate.quad(lambda z: q.pdf(z) * (q.logpdf(z) - p.logpdf(z)), mu - 12 * q.std(), mu + 12 * q.std())
    return value


def test_gaussian_kl_matches_quadrature():
    mean = rand((2, 3), 1)
    logvar = rand((2, 3), 2) * 0.7
    got = np.asarray(jax.jit(gaussian_kl)(mean, logvar))
    ref = [np.mean([kl_by_quadrature(float(mean[b, i]), float(logvar[b, i])) for i in range(3)]) for b in range(2)]
    assert got.shape == (2,) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # the prior itself costs nothing
    np.testing.assert_allclose(gaussian_kl(jnp.zeros((2, 4, 5)), jnp.zeros((2, 4, 5))), [0.0, 0.0], atol=1e-7)


def test_reconstruction_losses_match_loops():
    pred, target = rand((3, 2, 4, 5), 3), rand((3, 2, 4, 5), 4)
    mse, l1 = np.zeros(3), np.zeros(3)
    for b in range(3):
        values = [(float(p) - float(t)) for p, t in zip(pred[b].ravel(), target[b].ravel())]
        mse[b] = sum(v * v for v in values) / len(values)
        l1[b] = sum(abs(v) for v in values) / len(values)
    np.testing.assert_allclose(feature_reconstruction(pred, target), mse, rtol=1e-5)
    np.testing.assert_allclose(pixel_reconstruction(pred, target, "l2"), mse, rtol=1e-5)
    np.testing.assert_allclose(pixel_reconstruction(pred, target, "l1"), l1, rtol=1e-5)
    np.testing.assert_allclose(pixel_reconstruction(pred, target, "l1+l2"), l1 + mse, rtol=1e-5)
    # bfloat16 inputs are computed in float32
    got = feature_reconstruction(jnp.asarray(pred, jnp.bfloat16), jnp.asarray(target, jnp.bfloat16))
    assert got.dtype == jnp.float32


def test_loss_errors():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=r"'l3'.*'l1', 'l2', 'l1\+l2'"):
        pixel_reconstruction(x, x, "l3")
    with pytest.raises(ValueError, match=r"\(2, 3\) vs \(2, 4\)"):
        feature_reconstruction(x, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="shapes differ"):
        gaussian_kl(x, jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match="both be arrays or both be lists"):
        feature_distance([x], x)
    with pytest.raises(ValueError, match="2 predicted and 1 target"):
        feature_distance([x, x], [x])
    with pytest.raises(ValueError, match="batch sizes differ"):
        hinge_discriminator(jnp.zeros((2, 4)), jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="anchors must be scalars"):
        lecam(x, x, jnp.zeros(2), 0.0)


def torch_feature_distance(pred, target):
    p = F.normalize(torch.from_numpy(pred).double(), dim=-1, eps=1e-6)
    t = F.normalize(torch.from_numpy(target).double(), dim=-1, eps=1e-6)
    return ((p - t) ** 2).sum(-1).mean(-1).numpy()


def test_feature_distance_matches_torch_normalize():
    pred, target = rand((2, 7, 16), 5) * 3, rand((2, 7, 16), 6)
    pred[0, 0] = 0.0  # a zero vector: torch clamps the norm at eps, so it stays zero
    np.testing.assert_allclose(jax.jit(feature_distance)(pred, target), torch_feature_distance(pred, target),
                               rtol=1e-5, atol=1e-6)
    # a list of layers is the mean of the per-layer distances
    pred2, target2 = rand((2, 3, 8), 7), rand((2, 3, 8), 8)
    ref = (torch_feature_distance(pred, target) + torch_feature_distance(pred2, target2)) / 2
    np.testing.assert_allclose(feature_distance([pred, pred2], (target, target2)), ref, rtol=1e-5, atol=1e-6)
    # scale-invariant per token, finite gradient through the zero vector
    np.testing.assert_allclose(feature_distance(pred[1:] * 5, pred[1:]), [0.0], atol=1e-6)
    grad = jax.grad(lambda p: feature_distance(p, target).sum())(jnp.asarray(pred))
    assert np.all(np.isfinite(grad))


def test_hinge_and_lecam_hand_computed():
    real = jnp.array([[0.5, 2.0], [-1.0, 1.0]])
    fake = jnp.array([[-2.0, 0.0], [3.0, -0.5]])
    # real: relu(1 - r) = [0.5, 0] -> 0.25 and [2, 0] -> 1; fake: relu(1 + f) = [0, 1] -> 0.5 and [4, 0.5] -> 2.25
    np.testing.assert_allclose(hinge_discriminator(real, fake), [0.75, 3.25])
    np.testing.assert_allclose(hinge_generator(fake), [1.0, -1.25])
    # anchors real 0.5, fake -0.5: relu(r + 0.5)² = [1, 6.25] -> 3.625 and [0, 2.25] -> 1.125;
    # relu(0.5 - f)² = [6.25, 0.25] -> 3.25 and [0, 1] -> 0.5
    np.testing.assert_allclose(lecam(real, fake, 0.5, -0.5), [6.875, 1.625])
    # no gradient into the anchors
    assert jax.grad(lambda a: lecam(real, fake, a, -0.5).sum())(0.5) == 0.0
    np.testing.assert_allclose(adaptive_gan_weight(2.0, 1.0 - 1e-4), 2.0, rtol=1e-6)
    assert float(adaptive_gan_weight(1.0, 0.0, max_weight=10.0)) == 10.0


def test_noisy_features_statistics_and_determinism():
    feats = jnp.asarray(rand((4, 64, 32), 9)) * jnp.array([0.1, 1.0, 5.0, 20.0])[:, None, None]
    rng = jax.random.PRNGKey(3)
    noisy = jax.jit(noisy_features)
    out = noisy(feats, rng, 0.4)
    assert out.shape == feats.shape and out.dtype == feats.dtype
    np.testing.assert_array_equal(out, noisy(feats, rng, 0.4))
    np.testing.assert_allclose(out, noisy_features(feats, rng, 0.4), rtol=1e-5, atol=1e-5)  # eager: no fusion
    rms = np.sqrt(np.mean(np.square(np.asarray(feats)), axis=(1, 2)))
    noise_std = np.std(np.asarray(out - feats), axis=(1, 2))
    np.testing.assert_allclose(noise_std / rms, 0.4, rtol=0.05)  # 2048 samples per example
    assert not np.allclose(out, noisy(feats, jax.random.PRNGKey(4), 0.4))
    # an explicit scale replaces the RMS; dtype is kept
    small = feats[:2].astype(jnp.bfloat16)  # |values| < 5: bfloat16 rounding stays far below the noise
    out = noisy_features(small, rng, 0.5, scale=2.0)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.std(np.asarray(out, np.float32) - np.asarray(small, np.float32)), 1.0, rtol=0.05)
    # the scale is a constant: the gradient w.r.t. the features is the identity
    grad = jax.grad(lambda f: noisy_features(f, rng, 0.4).sum())(feats)
    np.testing.assert_allclose(grad, np.ones(feats.shape), atol=1e-6)


@pytest.mark.parametrize("size,num_layers", [(32, 2), (64, 3)])
def test_discriminator_shapes_and_gradients(size, num_layers):
    disc = PatchDiscriminator(channels=8, num_layers=num_layers)
    images = jnp.tanh(jnp.asarray(rand((2, size, size, 3), 10)))
    params = nn.meta.unbox(jax.jit(disc.init)(jax.random.PRNGKey(0), images))["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))

    def loss(p):  # hinge alone gives the last bias zero gradient when every margin is active
        real, fake = disc.apply({"params": p}, images), disc.apply({"params": p}, -images)
        return (hinge_discriminator(real, fake) + lecam(real, fake, 0.0, 0.0)).sum(), real

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    side = size // 2**num_layers
    assert logits.shape == (2, side, side) and logits.dtype == jnp.float32
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.any(np.asarray(g) != 0), f"zero gradient for {jax.tree_util.keystr(path)}"


def test_discriminator_axes_and_errors():
    disc = PatchDiscriminator(channels=8, num_layers=2, dtype=jnp.bfloat16)
    boxed = jax.eval_shape(disc.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
    assert boxed["conv_1"]["kernel"].names == (None, None, "conv_in", "conv_out")
    assert boxed["conv_1"]["kernel"].value.shape == (4, 4, 8, 16)
    assert boxed["norm_1"]["scale"].names == ("conv_out",)
    assert "bias" not in boxed["conv_1"]  # the norm's bias replaces it
    assert jax.eval_shape(disc.apply, nn.meta.unbox({"params": boxed}), jnp.zeros((1, 8, 8, 3))).dtype == jnp.float32
    with pytest.raises(ValueError, match=r"\(B, H, W, C\).*\(8, 8, 3\)"):
        disc.init(jax.random.PRNGKey(0), jnp.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match=r"8×2.*expected H, W >= 4"):
        disc.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 2, 3)))

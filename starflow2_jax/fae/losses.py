"""Losses of the feature auto-encoder (SPEC §3) and of its pixel decoder's GAN fine-tuning.

Every loss is a pure, jit-able function that computes in float32 and returns one value per example,
shape (B,), so that callers average, weight or mask as they need. "Per example" means the mean over
all non-batch axes (axis 0 is the batch).

- encoder + feature decoder: ``feature_reconstruction`` (‖F̂ − F‖²) + β · ``gaussian_kl``;
- pixel decoder: stage Ia on ``noisy_features`` of real features, then ``pixel_reconstruction`` +
  ``feature_distance`` (perceptual) + ``hinge_generator`` weighted by ``adaptive_gan_weight``;
- discriminator: ``hinge_discriminator`` + ``lecam`` regularisation.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

PIXEL_KINDS = ("l1", "l2", "l1+l2")
_NORMALIZE_EPS = 1e-6


def _per_example_mean(x: jax.Array) -> jax.Array:
    """(B, ...) -> (B,): the mean over all non-batch axes."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _check_batched(name: str, x: jax.Array) -> None:
    if x.ndim < 1:
        raise ValueError(f"{name}: expected an array with a leading batch axis, got a scalar (shape {x.shape})")


def _check_same_shape(what: str, a: jax.Array, b: jax.Array) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}; expected equal shapes")
    _check_batched(what, a)


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) ‖ N(0, I)) of a diagonal Gaussian, averaged over the non-batch axes.

    Per element ½·(mean² + exp(logvar) − 1 − logvar). ``mean``, ``logvar``: (B, ...) of equal
    shape, e.g. (B, N, D). Returns (B,) float32. The sum over elements is this times their count.
    """
    _check_same_shape("gaussian_kl(mean, logvar)", mean, logvar)
    mean = mean.astype(jnp.float32)
    logvar = logvar.astype(jnp.float32)
    return _per_example_mean(0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar))


def feature_reconstruction(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error ‖F̂ − F‖² over the non-batch axes. (B, ...) x2 -> (B,) float32."""
    _check_same_shape("feature_reconstruction(pred, target)", pred, target)
    diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
    return _per_example_mean(jnp.square(diff))


def pixel_reconstruction(pred: jax.Array, target: jax.Array, kind: str = "l2") -> jax.Array:
    """Pixel loss, means over the non-batch axes. (B, H, W, C) x2 -> (B,) float32.

    ``kind``: 'l1' (mean |Δ|), 'l2' (mean Δ²) or 'l1+l2' (the sum of both).
    """
    if kind not in PIXEL_KINDS:
        raise ValueError(f"pixel_reconstruction: unknown kind {kind!r}; expected one of {PIXEL_KINDS}")
    _check_same_shape("pixel_reconstruction(pred, target)", pred, target)
    diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
    loss = jnp.zeros(diff.shape[:1], jnp.float32)
    if kind in ("l1", "l1+l2"):
        loss = loss + _per_example_mean(jnp.abs(diff))
    if kind in ("l2", "l1+l2"):
        loss = loss + _per_example_mean(jnp.square(diff))
    return loss


def _unit_normalize(x: jax.Array) -> jax.Array:
    """x / max(‖x‖, eps) along the last axis (torch's ``F.normalize``), with a finite gradient at 0."""
    sq_norm = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    # sqrt(max(‖x‖², eps²)) == max(‖x‖, eps) but never differentiates sqrt at 0.
    return x * jax.lax.rsqrt(jnp.maximum(sq_norm, _NORMALIZE_EPS**2))


def _one_layer_distance(pred: jax.Array, target: jax.Array) -> jax.Array:
    _check_same_shape("feature_distance(pred_features, target_features)", pred, target)
    if pred.ndim < 2:
        raise ValueError(f"feature_distance: expected features (B, N, C), got shape {tuple(pred.shape)}")
    diff = _unit_normalize(pred.astype(jnp.float32)) - _unit_normalize(target.astype(jnp.float32))
    per_token = jnp.sum(jnp.square(diff), axis=-1)  # (B, N)
    return _per_example_mean(per_token)


def feature_distance(
    pred_features: jax.Array | Sequence[jax.Array], target_features: jax.Array | Sequence[jax.Array]
) -> jax.Array:
    """Perceptual (LPIPS-style, unweighted) distance in a frozen feature space. Returns (B,) float32.

    Every feature vector (last axis) is unit-normalised (x / max(‖x‖, 1e-6), as torch's
    ``F.normalize``); the distance is the squared Euclidean distance per token, averaged over tokens.
    Inputs: (B, N, C) arrays (any (B, ..., C) works: all middle axes count as tokens), or equal-length
    lists/tuples of them, one per layer, whose distances are averaged over the layers.
    """
    pred_is_list = isinstance(pred_features, (list, tuple))
    target_is_list = isinstance(target_features, (list, tuple))
    if pred_is_list != target_is_list:
        raise ValueError(
            "feature_distance: pred_features and target_features must both be arrays or both be "
            f"lists of per-layer arrays, got {type(pred_features).__name__} and {type(target_features).__name__}"
        )
    if not pred_is_list:
        return _one_layer_distance(pred_features, target_features)
    if len(pred_features) != len(target_features) or not pred_features:
        raise ValueError(
            f"feature_distance: expected equal, non-zero numbers of layers, got {len(pred_features)} "
            f"predicted and {len(target_features)} target"
        )
    distances = [_one_layer_distance(p, t) for p, t in zip(pred_features, target_features)]
    return sum(distances) / len(distances)


def _check_logits(what: str, real: jax.Array, fake: jax.Array) -> None:
    _check_batched(f"{what}: real_logits", real)
    _check_batched(f"{what}: fake_logits", fake)
    if real.shape[0] != fake.shape[0]:
        raise ValueError(
            f"{what}: batch sizes differ, real {tuple(real.shape)} vs fake {tuple(fake.shape)}; expected equal"
        )


def hinge_discriminator(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """Hinge loss of the discriminator: mean(relu(1 − real)) + mean(relu(1 + fake)). Returns (B,).

    ``real_logits``, ``fake_logits``: (B, ...) (e.g. PatchGAN maps (B, h, w)); means per example.
    """
    _check_logits("hinge_discriminator", real_logits, fake_logits)
    real = real_logits.astype(jnp.float32)
    fake = fake_logits.astype(jnp.float32)
    return _per_example_mean(jax.nn.relu(1.0 - real)) + _per_example_mean(jax.nn.relu(1.0 + fake))


def hinge_generator(fake_logits: jax.Array) -> jax.Array:
    """Generator side of the hinge GAN: −mean(fake_logits) per example. (B, ...) -> (B,) float32."""
    _check_batched("hinge_generator: fake_logits", fake_logits)
    return -_per_example_mean(fake_logits.astype(jnp.float32))


def lecam(
    real_logits: jax.Array, fake_logits: jax.Array, anchor_real: jax.Array | float, anchor_fake: jax.Array | float
) -> jax.Array:
    """LeCam regulariser (Tseng et al. 2021) of the discriminator. Returns (B,) float32.

    mean(relu(real − anchor_fake)²) + mean(relu(anchor_real − fake)²) per example. The anchors are
    scalars (typically EMAs of the mean real / fake logits; tracking them is the caller's job) and are
    treated as constants: no gradient flows into them.
    """
    _check_logits("lecam", real_logits, fake_logits)
    anchor_real = jax.lax.stop_gradient(jnp.asarray(anchor_real, jnp.float32))
    anchor_fake = jax.lax.stop_gradient(jnp.asarray(anchor_fake, jnp.float32))
    if anchor_real.ndim or anchor_fake.ndim:
        raise ValueError(
            f"lecam: anchors must be scalars, got shapes {anchor_real.shape} (real) and {anchor_fake.shape} (fake)"
        )
    real = real_logits.astype(jnp.float32)
    fake = fake_logits.astype(jnp.float32)
    return _per_example_mean(jnp.square(jax.nn.relu(real - anchor_fake))) + _per_example_mean(
        jnp.square(jax.nn.relu(anchor_real - fake))
    )


def adaptive_gan_weight(
    rec_grad_norm: jax.Array | float, gan_grad_norm: jax.Array | float, max_weight: float = 1e4
) -> jax.Array:
    """VQGAN's adaptive GAN weight ‖∇rec‖ / (‖∇gan‖ + 1e-4), clipped to [0, max_weight]. Scalar float32.

    Both norms are gradients w.r.t. the decoder's last layer. The result is a constant (stop-gradient).
    """
    rec = jnp.asarray(rec_grad_norm, jnp.float32)
    gan = jnp.asarray(gan_grad_norm, jnp.float32)
    return jax.lax.stop_gradient(jnp.clip(rec / (gan + 1e-4), 0.0, max_weight))


def noisy_features(
    features: jax.Array, rng: jax.Array, sigma: float | jax.Array, scale: float | jax.Array | None = None
) -> jax.Array:
    """Stage-Ia augmentation of the pixel decoder: features + sigma · scale · ε, ε ~ N(0, I).

    ``features``: (B, ...), e.g. (B, N, C). ``scale`` defaults to the per-example RMS of ``features``
    over all non-batch axes (stop-gradient), so ``sigma`` is relative to the feature scale (SPEC §3:
    σ = 0.4); a given ``scale`` must broadcast against ``features``. Returns the shape and dtype of
    ``features``; the same ``rng`` gives the same noise.
    """
    _check_batched("noisy_features: features", features)
    x = features.astype(jnp.float32)
    if scale is None:
        rms = jnp.sqrt(jnp.mean(jnp.square(x), axis=tuple(range(1, x.ndim)), keepdims=True))  # (B, 1, ..., 1)
        scale = jax.lax.stop_gradient(rms)
    noise = jax.random.normal(rng, x.shape, jnp.float32)
    return (x + jnp.asarray(sigma, jnp.float32) * jnp.asarray(scale, jnp.float32) * noise).astype(features.dtype)

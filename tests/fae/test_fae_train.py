"""The tiny FAE trained through the shared loop, stage by stage, on the embedded photos + digits.

Oracle: the same reconstruction errors (``fae.api.reconstruction_errors``) of the freshly
initialised FAE on the same held-out images with the same frozen DINOv2. Training must lower the
feature error (stage ib) and the pixel error (stages ia and ii) measurably; the numbers are printed.

The three stage workdirs are built once per module and reused by the latent-space tests
(``trained_fae`` fixture in conftest.py).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starflow2_jax.fae import api as fae_api
from starflow2_jax.fae.latent_space import Bound, FAESpace
from starflow2_jax.train.tasks import latents as latents_lib
from starflow2_jax.train.tasks.fae import FAETask, fae_config_from

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("trained_fae")]


def _held_out_images(data_dir, n=32):
    from starflow2_jax.data.photos import build_photos
    from starflow2_jax.data.preprocess import ImagePreprocess

    source = build_photos(data_dir).as_data_source("test")
    prep = ImagePreprocess(levels=255, image_size=32, channels=3)
    rng = np.random.default_rng(0)
    picks = np.linspace(0, len(source) - 1, n).astype(int)  # photo tiles first, then digits
    return np.stack([prep(source[int(i)], rng)["image"] for i in picks])


def test_training_lowers_feature_and_pixel_error(trained_fae, record_property):
    workdirs, config, data_dir = trained_fae
    images = jnp.asarray(_held_out_images(data_dir))
    trained = latents_lib.load_fae_variables(workdirs["ii"])
    fae_config = fae_config_from(config)
    task = FAETask.from_config(config)
    fresh, _ = task.init(jax.random.key(123))
    init_vars = {"dinov2": trained["dinov2"], "fae": nn.meta.unbox(fresh)}

    errors = jax.jit(fae_api.reconstruction_errors, static_argnums=0)
    before = {k: float(jnp.mean(v)) for k, v in errors(fae_config, init_vars, images).items()}
    after = {k: float(jnp.mean(v)) for k, v in errors(fae_config, trained, images).items()}
    record_property("summary", f"FAE tiny, held-out tiles (seed 0): feature error (relative MSE) "
                    f"{before['feature_mse']:.4f} -> {after['feature_mse']:.4f}; "
                    f"pixel MSE {before['pixel_mse']:.4f} -> "
                    f"{after['pixel_mse']:.4f} (pixel decoder on real features {before['pixel_mse_real']:.4f} -> "
                    f"{after['pixel_mse_real']:.4f})")
    assert after["feature_mse"] < 0.5 * before["feature_mse"]
    assert after["pixel_mse"] < 0.5 * before["pixel_mse"]
    assert after["pixel_mse_real"] < 0.5 * before["pixel_mse_real"]


def test_latent_statistics_are_stored_and_standardise_the_latents(trained_fae):
    """Stage ib stores statistics over stats_batches × batch × 64 tokens; stage ii carries them over
    unchanged; normalised latents of 256 random training tiles (not the batches the statistics came
    from) have per-channel means near 0 and standard deviations near 1."""
    workdirs, config, data_dir = trained_fae
    trained = latents_lib.load_fae_variables(workdirs["ib"])
    stats = jax.device_get(trained["latent_stats"])
    assert stats["count"] == config.model.fae.stats_batches * config.data.batch_size * 64
    assert np.all(stats["std"] > 0) and np.all(np.isfinite(stats["mean"]))
    # the stage-ii checkpoint carries the same statistics forward
    later = jax.device_get(latents_lib.load_fae_variables(workdirs["ii"])["latent_stats"])
    np.testing.assert_array_equal(later["mean"], stats["mean"])
    # normalised latents of training-like images are roughly standardised
    fae_config = fae_config_from(config)
    space = Bound(FAESpace(fae_config), trained)
    from starflow2_jax.data.photos import build_photos
    from starflow2_jax.data.preprocess import ImagePreprocess

    source = build_photos(data_dir).as_data_source("train")
    prep = ImagePreprocess(levels=255, image_size=32, channels=3)
    rng = np.random.default_rng(1)
    picks = rng.choice(len(source), 256, replace=False)
    imgs = np.stack([prep(source[int(i)], rng)["image"] for i in picks])
    z = np.asarray(space.encode(jnp.asarray(imgs))).reshape(-1, fae_config.latent_dim)
    assert np.all(np.abs(z.mean(0)) < 0.5), z.mean(0)
    assert np.all((z.std(0) > 0.5) & (z.std(0) < 2.0)), z.std(0)


def test_stage_ia_noise_is_relative_to_feature_scale():
    """The FAE task's stage-ia input is F + 0.4·rms(F)·ε (oracle: the definition, on a known F)."""
    from starflow2_jax.fae.losses import noisy_features

    feats = 7.0 * jax.random.normal(jax.random.key(0), (4, 64, 32))
    noisy = noisy_features(feats, jax.random.key(1), 0.4)
    rel = jnp.std(noisy - feats) / jnp.sqrt(jnp.mean(jnp.square(feats)))
    assert abs(float(rel) - 0.4) < 0.02

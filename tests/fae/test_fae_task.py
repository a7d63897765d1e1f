"""The FAE task with a Hugging Face DINOv2 checkpoint, stage freezing, and config errors.

Oracles: transformers' ``Dinov2Model`` (the frozen weights the trainer loaded must give its patch
features), the stage-ia checkpoint itself (parts a stage does not train must come out bit-identical).
"""

import os

import jax
import numpy as np
import pytest
import torch

from starflow2_jax.config_files import load_config
from starflow2_jax.fae.dinov2 import dinov2_features
from starflow2_jax.train import validate
from starflow2_jax.train.loop import resolve_config, train
from starflow2_jax.train.restore import restore_workdir
import dinov2_hf_tiny as hf_tiny

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAE = os.path.join(REPO, "configs", "fae.py")


def _tiny(stage, tmp_path, *overrides):
    return load_config(f"{FAE}:tiny,{stage},runlocal", [f"data.data_dir={tmp_path / 'tfds'}",
                                                         "train.async_checkpoint=False", *overrides])


def _save_hf(name, directory) -> str:
    hf_tiny.build(name).save_pretrained(directory)
    return os.fspath(directory)


DINO_FIELDS = ["model.fae.dinov2.image_size=16"]  # the tiny HF models: 32 wide, 2 layers, patch 4, 16 px native


@pytest.mark.slow
def test_stage_loads_the_hf_dinov2_and_freezes_the_parts_it_does_not_train(tmp_path):
    ckpt = _save_hf("plain", tmp_path / "dino")
    config = _tiny("ia", tmp_path, f"model.fae.dinov2_checkpoint={ckpt}", *DINO_FIELDS)
    train(config, tmp_path / "ia")
    restored = restore_workdir(tmp_path / "ia", ema=False)
    images = hf_tiny.images((2, 32, 32, 3))
    ours = np.asarray(dinov2_features(restored.task.config.dinov2, restored.extra["dinov2"], images))
    with torch.no_grad():
        want = hf_tiny.hf_features(hf_tiny.build("plain"), hf_tiny.CONFIGS["plain"], images)
    np.testing.assert_allclose(ours, want, atol=1e-4)

    # stage ib from ia: the pixel decoder (trained in ia) must come through unchanged
    config_ib = _tiny("ib", tmp_path, f"model.fae.dinov2_checkpoint={ckpt}", *DINO_FIELDS,
                      f"train.init_from={tmp_path / 'ia'}")
    train(config_ib, tmp_path / "ib")
    ib = restore_workdir(tmp_path / "ib", ema=False)
    for part, same in (("pixel_decoder", True), ("discriminator", True), ("encoder", False)):
        a, b = jax.tree.leaves(restored.params[part]), jax.tree.leaves(ib.params[part])
        equal = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
        assert equal == same, part
    assert float(ib.extra["latent_stats"]["count"]) > 0  # computed at ib's last step

    from starflow2_jax.train.generate import sample_from_workdir

    with pytest.raises(ValueError, match=r"starflow2 sample\` does not apply .* model.family='fae' run, whose family offers \['eval fae'\]"):
        sample_from_workdir(tmp_path / "ib", tmp_path / "grid.png")
    assert not (tmp_path / "grid.png").exists()


def test_wrong_dinov2_variant_is_a_clear_error(tmp_path):
    ckpt = _save_hf("registers", tmp_path / "dino_reg")
    config = _tiny("ia", tmp_path, f"model.fae.dinov2_checkpoint={ckpt}", *DINO_FIELDS)
    with pytest.raises(ValueError, match="num_register_tokens: checkpoint 4, expected 0"):
        resolve_config(config)
    giant = load_config(f"{FAE}:g14_256,ia", ["data.data_dir=/datasets/x", f"model.fae.dinov2_checkpoint={ckpt}"])
    with pytest.raises(ValueError, match="hidden_size: checkpoint 32, expected 1536"):
        resolve_config(giant)


def test_fae_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="model.fae.stage='iii'"):
        validate(_tiny("ia", tmp_path, "model.fae.stage=iii"))
    with pytest.raises(ValueError, match="optim.ema_decay=0.9: must be 0 for model.family='fae'"):
        validate(_tiny("ia", tmp_path, "optim.ema_decay=0.9"))
    with pytest.raises(ValueError, match="model.fae.pixel_loss='l3'"):
        validate(_tiny("ia", tmp_path, "model.fae.pixel_loss=l3"))
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        resolve_config(_tiny("ia", tmp_path, f"model.fae.dinov2_checkpoint={tmp_path / 'missing'}"))
    from starflow2_jax.train.families import make_task as task_from_config

    with pytest.raises(ValueError, match=r"FAEConfig.image_size=30 \(the DINOv2 input size\) is not divisible"):
        task_from_config(resolve_config(_tiny("ia", tmp_path, "model.fae.image_size=30")))


def test_grey_batches_are_rejected_with_a_hint(tmp_path):
    from starflow2_jax.train.families import make_task as task_from_config

    task = task_from_config(resolve_config(_tiny("ia", tmp_path)))
    with pytest.raises(ValueError, match="grey .*data.channels=3"):
        task.prepare_batch({"image": np.zeros((2, 32, 32, 1), np.float32)})
    with pytest.raises(ValueError, match="16x16: this FAE takes 32x32"):
        task.prepare_batch({"image": np.zeros((2, 16, 16, 3), np.float32)})


def test_eval_step_and_prior_grid(tmp_path):
    """eval_step gives the reconstruction errors of ``fae.api`` per example; the grid decodes prior
    samples to images in [-1, 1] of the configured size."""
    import flax.linen as nn

    from starflow2_jax.fae import api as fae_api
    from starflow2_jax.train.families import make_task as task_from_config

    task = task_from_config(resolve_config(_tiny("ii", tmp_path)))
    params, extra = task.init(jax.random.key(0))
    params = nn.meta.unbox(params)
    images = jax.random.uniform(jax.random.key(1), (3, 32, 32, 3), minval=-1, maxval=1)
    got = task.eval_step(params, extra, {"image": images}, jax.random.key(2))
    want = fae_api.reconstruction_errors(task.config, {"fae": params, "dinov2": extra["dinov2"]}, images)
    assert set(got) == {"feature_mse", "pixel_mse", "pixel_mse_real"} and got["pixel_mse"].shape == (3,)
    for name in got:
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), rtol=1e-6)
    grid = task.sample_grid(params, extra, jax.random.key(3), guidance=0.0)
    assert grid.images.shape == (task.per_class, 8, 32, 32, 3) and float(np.abs(grid.images).max()) <= 1.0
    loss, metrics = task.loss(params, extra, {"image": images}, jax.random.key(4))
    assert np.isfinite(float(loss)) and {"pixel", "perceptual", "gan_g", "gan_d", "lecam"} <= set(metrics)


def test_perceptual_features_pass_gradients_to_images_only(tmp_path):
    """The perceptual term must reach the pixel decoder (through the images) but never DINOv2."""
    from starflow2_jax.fae import api as fae_api
    from starflow2_jax.fae.losses import feature_distance
    from starflow2_jax.train.families import make_task as task_from_config

    task = task_from_config(resolve_config(_tiny("ia", tmp_path)))
    _, extra = task.init(jax.random.key(0))
    real = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
    target = fae_api.encoder_features(task.config, extra["dinov2"], real)

    def distance(images, dino, image_gradient):
        feats = fae_api.encoder_features(task.config, dino, images, image_gradient=image_gradient)
        return feature_distance(feats, target).sum()

    fake = real[::-1]
    g_img, g_dino = jax.grad(distance, argnums=(0, 1))(fake, extra["dinov2"], True)
    assert float(np.abs(g_img).max()) > 0
    assert all(float(np.abs(x).max()) == 0 for x in jax.tree.leaves(g_dino))
    g_img_off = jax.grad(distance)(fake, extra["dinov2"], False)
    assert float(np.abs(g_img_off).max()) == 0


def test_frozen_dinov2_is_sharded_by_the_rules(tmp_path):
    """DINOv2 lives in extra_vars but is laid out like parameters: 'embed' over fsdp (not replicated)."""
    from starflow2_jax import parallel
    from starflow2_jax.train.optim import make_optimizer
    from starflow2_jax.train.step import state_shardings
    from starflow2_jax.train.families import make_task as task_from_config

    config = resolve_config(_tiny("ia", tmp_path))
    task = task_from_config(config)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    optimizer, _ = make_optimizer(config.optim, 4, trainable=task.trainable)
    shardings = state_shardings(task, optimizer, mesh, ema=False)
    dino = shardings.extra["dinov2"]
    sharded = [s for s in jax.tree.leaves(dino) if not s.is_fully_replicated]
    assert len(sharded) >= len(jax.tree.leaves(dino)) // 2, "DINOv2 should be sharded like the parameters"
    assert all(s.is_fully_replicated for s in jax.tree.leaves(shardings.extra["latent_stats"]))


def test_a_bad_dinov2_source_fails_before_anything_is_written(tmp_path):
    """Missing, another architecture, a mis-shaped tensor: one clear error from ``train`` before any
    step, and the workdir is never created."""
    from safetensors.numpy import load_file, save_file

    plain = _save_hf("plain", tmp_path / "dino")
    weights = os.path.join(plain, "model.safetensors")
    tensors = load_file(weights)
    tensors["embeddings.cls_token"] = np.zeros((1, 1, 31), tensors["embeddings.cls_token"].dtype)
    save_file(tensors, weights, metadata={"format": "pt"})
    cases = [(os.fspath(tmp_path / "missing"), FileNotFoundError, "is not a directory"),
             (_save_hf("registers", tmp_path / "dino_reg"), ValueError, "num_register_tokens: checkpoint 4, expected 0"),
             (plain, ValueError, r"with the wrong shape: .*embeddings\.cls_token: \(1, 1, 31\)")]
    for source, error, match in cases:
        config = _tiny("ia", tmp_path, f"model.fae.dinov2_checkpoint={source}", *DINO_FIELDS)
        with pytest.raises(error, match=match):
            train(config, tmp_path / "run")
        assert not (tmp_path / "run").exists()


def test_a_random_dinov2_source_is_what_the_task_initialises(tmp_path):
    """'' as the DINOv2 source regenerates the weights ``FAETask.init`` gives DINOv2 under the train
    state's key chain (so random-DINOv2 runs keep their features without storing them)."""
    import flax.linen as nn

    from starflow2_jax.train.families import make_task
    from starflow2_jax.train.tasks.fae import random_dinov2

    task = make_task(resolve_config(_tiny("ia", tmp_path)))
    _, extra = task.init(jax.random.split(jax.random.key(7))[0])  # train.step: key(seed) → model key
    want, got = nn.meta.unbox(extra["dinov2"]), random_dinov2(task.config.dinov2, 7)
    assert jax.tree.structure(want) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = random_dinov2(task.config.dinov2, 8)
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(want),
                                                                               jax.tree.leaves(other)))

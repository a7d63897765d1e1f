"""The latent-space interface: 'patches' is an exact round trip, 'fae' runs sharded like on one
device, flows train on either by a config switch, and bad inputs get clear errors."""

import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from starflow2_jax import flow, parallel
from starflow2_jax.config_files import load_config
from starflow2_jax.fae import api as fae_api
from starflow2_jax.fae.config import FAEConfig
from starflow2_jax.fae.dinov2 import Dinov2Config, init_dinov2
from starflow2_jax.fae.latent_space import Bound, FAESpace, PatchesSpace, check_latent_stats
from starflow2_jax.train.tasks import FlowTask

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny_fae_config(**kw) -> FAEConfig:
    dino = Dinov2Config(hidden_size=32, num_layers=2, num_heads=4, patch_size=4, image_size=32)
    return FAEConfig(dinov2=dino, image_size=32, latent_dim=8, encoder_heads=2, feature_decoder_width=32,
                     feature_decoder_layers=2, feature_decoder_heads=2, pixel_decoder_width=32,
                     pixel_decoder_layers=2, pixel_decoder_heads=2, **kw).validate()


def _random_variables(config: FAEConfig, seed=0) -> dict:
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    perturb = lambda t, k: jax.tree.map(  # noqa: E731  (nonzero everywhere: zero-init heads would hide bugs)
        lambda x, kk: x + 0.05 * jax.random.normal(kk, x.shape), t,
        jax.tree.unflatten(jax.tree.structure(t), list(jax.random.split(k, len(jax.tree.leaves(t))))))
    stats = {"mean": 0.1 * jnp.arange(config.latent_dim, dtype=jnp.float32),
             "std": 0.5 + 0.1 * jnp.arange(config.latent_dim, dtype=jnp.float32), "count": jnp.float32(100.0)}
    return {"dinov2": init_dinov2(config.dinov2, k1),
            "fae": perturb(nn.meta.unbox(fae_api.init_boxed(config, k2)), k3), "latent_stats": stats}


# ---- patches ---------------------------------------------------------------------------------
@pytest.mark.parametrize("h,w,c,p", [(8, 8, 1, 2), (12, 8, 3, 4), (6, 6, 3, 1)])
def test_patches_round_trip_is_exact_and_matches_a_loop_oracle(h, w, c, p):
    space = PatchesSpace(h, w, c, p)
    images = np.random.default_rng(0).standard_normal((3, h, w, c)).astype(np.float32)
    latents = np.asarray(space.encode({}, jnp.asarray(images)))
    oracle = np.zeros((3, (h // p) * (w // p), p * p * c), np.float32)
    for b in range(3):
        for r in range(h // p):
            for q in range(w // p):
                for i in range(p):
                    for j in range(p):
                        for ch in range(c):
                            oracle[b, r * (w // p) + q, (i * p + j) * c + ch] = images[b, r * p + i, q * p + j, ch]
    np.testing.assert_array_equal(latents, oracle)
    np.testing.assert_array_equal(np.asarray(space.decode({}, jnp.asarray(latents))), images)
    assert space.grid == (h // p, w // p) and space.latent_dim == p * p * c


def test_patches_errors_name_the_sizes():
    with pytest.raises(ValueError, match="not divisible by the patch size 3"):
        PatchesSpace(8, 8, 1, 3)
    space = PatchesSpace(8, 8, 1, 2)
    with pytest.raises(ValueError, match=r"expected \(B, 8, 8, 1\)"):
        space.encode({}, jnp.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match=r"expected \(B, 16, 4\)"):
        space.decode({}, jnp.zeros((2, 16, 5)))


def test_patches_flow_equals_the_pixel_flow_with_that_patch_size():
    """Oracle: the same STARFlow on pixels with patch 2 (its own patchify) — identical z and logdets."""
    pixel_cfg = flow.starflow_config(1, 8, 2, 32, layers_per_block=[1, 1], head_dim=16)
    latent_cfg = flow.starflow_config(4, 4, 1, 32, layers_per_block=[1, 1], head_dim=16)
    variables = flow.init(pixel_cfg, jax.random.key(0))
    variables = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(1), x.shape), variables)
    images = jax.random.uniform(jax.random.key(2), (2, 8, 8, 1), minval=-1, maxval=1)
    space = PatchesSpace(8, 8, 1, 2)
    latents = space.encode({}, images).reshape(2, 4, 4, 4)
    z_pix, ld_pix = flow.forward(pixel_cfg, variables, images)
    z_lat, ld_lat = flow.forward(latent_cfg, variables, latents)
    np.testing.assert_allclose(np.asarray(z_lat), np.asarray(z_pix), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ld_lat), np.asarray(ld_pix), atol=1e-5)


# ---- fae -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fae_encode_decode_sharded_equals_one_device():
    config = _tiny_fae_config()
    space = FAESpace(config)
    variables = _random_variables(config)
    images = jax.random.uniform(jax.random.key(3), (8, 32, 32, 3), minval=-1, maxval=1)
    want_z = np.asarray(jax.jit(space.encode)(variables, images))
    want_x = np.asarray(jax.jit(space.decode)(variables, jnp.asarray(want_z)))

    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    boxed = {"dinov2": jax.eval_shape(lambda: __import__("starflow2_jax.fae.dinov2", fromlist=["x"]).init_dinov2_boxed(
        config.dinov2, jax.random.key(0))), "fae": jax.eval_shape(lambda: fae_api.init_boxed(config, jax.random.key(0)))}
    shardings = parallel.logical_shardings(boxed, mesh, parallel.FAE_RULES)
    shardings["latent_stats"] = jax.tree.map(lambda _: NamedSharding(mesh, P()), variables["latent_stats"])
    placed = jax.tree.map(jax.device_put, variables, shardings)
    assert any(len(s.device_set) == 8 and not s.is_fully_replicated for s in jax.tree.leaves(shardings)), \
        "nothing is actually sharded"
    batch = NamedSharding(mesh, P(parallel.BATCH_AXES))
    with parallel.activation_rules(mesh, parallel.FAE_RULES):
        bound = Bound(space, placed)
        z = bound.encode(jax.device_put(images, batch))
        x = bound.decode(z)
    np.testing.assert_allclose(np.asarray(z), want_z, atol=1e-5)
    np.testing.assert_allclose(np.asarray(x), want_x, atol=1e-5)


def test_fae_encode_normalises_with_the_stored_statistics():
    """Oracle: the posterior mean from the functional API, normalised by hand."""
    config = _tiny_fae_config()
    variables = _random_variables(config, seed=1)
    images = jax.random.uniform(jax.random.key(4), (2, 32, 32, 3), minval=-1, maxval=1)
    feats = fae_api.encoder_features(config, variables["dinov2"], images)
    mean, _ = fae_api.encode_features(config, variables["fae"], feats)
    stats = variables["latent_stats"]
    z = FAESpace(config).encode(variables, images)
    np.testing.assert_allclose(np.asarray(z), np.asarray((mean - stats["mean"]) / stats["std"]), rtol=1e-5, atol=1e-5)
    rec = FAESpace(config).decode(variables, z)
    direct = fae_api.decode_pixels(config, variables["fae"], fae_api.decode_features(config, variables["fae"], mean))
    np.testing.assert_allclose(np.asarray(rec), np.asarray(direct), atol=1e-4)


def test_fae_bad_inputs_get_clear_errors():
    config = _tiny_fae_config()
    space = FAESpace(config)
    variables = _random_variables(config)
    with pytest.raises(ValueError, match="1 channels .*grey.*expects RGB"):
        space.encode(variables, jnp.zeros((2, 32, 32, 1)))
    with pytest.raises(ValueError, match="are 30x30: this FAE takes 32x32"):
        space.encode(variables, jnp.zeros((2, 30, 30, 3)))
    with pytest.raises(ValueError, match=r"expected \(B, 64, 8\)"):
        space.decode(variables, jnp.zeros((2, 64, 4)))
    with pytest.raises(ValueError, match="encoder_image_size=30 .* not divisible by its patch size 4"):
        _tiny_fae_config(encoder_image_size=30)
    empty = dict(variables, latent_stats=fae_api.empty_latent_stats(config))
    with pytest.raises(ValueError, match="no latent statistics"):
        check_latent_stats(empty)


# ---- flows on a latent space, by config switch -------------------------------------------------
def _demo(overrides, tmp_path):
    base = [f"data.data_dir={tmp_path / 'tfds'}", "train.async_checkpoint=False", "train.sample_every=2"]
    return load_config(os.path.join(REPO, "configs", "demo.py") + ":runlocal", base + list(overrides))


@pytest.mark.slow
def test_demo_config_runs_on_the_patches_latent_space(tmp_path):
    from starflow2_jax.train.loop import train

    config = _demo(["model.latent.kind=patches"], tmp_path)
    result = train(config, tmp_path / "run")
    assert result.step == config.train.steps and np.isfinite(result.metrics["loss"])
    assert os.path.exists(tmp_path / "run" / "samples" / "step_000002.png")
    stored = load_config_json(tmp_path / "run")
    assert stored["model"]["flow"]["kwargs"]["patch_size"] == 1 and stored["model"]["latent"]["patch"] == 2


@pytest.mark.slow
@pytest.mark.xdist_group("trained_fae")  # shares the session's trained FAE with test_fae_train.py
def test_demo_config_runs_on_the_fae_latent_space(tmp_path, trained_fae):
    from starflow2_jax.train.generate import sample_from_workdir
    from starflow2_jax.train.loop import train
    from starflow2_jax.train.restore import restore_workdir

    workdirs, _, _ = trained_fae
    config = _demo(["model.latent.kind=fae", f"model.latent.fae_workdir={workdirs['ii']}",
                    "model.latent.noise_std=0.1"], tmp_path)
    result = train(config, tmp_path / "run")
    assert result.step == config.train.steps and np.isfinite(result.metrics["loss"])
    assert "nll_per_dim" in result.metrics and "bits_per_dim" not in result.metrics
    stored = load_config_json(tmp_path / "run")
    assert (stored["data"]["image_size"], stored["data"]["channels"]) == (32, 3)  # digits → 32 px RGB for the FAE
    # the FAE is a frozen part: its weights are in none of the step checkpoints (the flow's, the FAE's)
    from starflow2_jax.train.checkpoint import complete_steps, stored_shapes

    for workdir in (tmp_path / "run", *map(Path, workdirs.values())):
        step_dir = workdir / "checkpoints" / str(complete_steps(workdir / "checkpoints")[-1])
        keys = set(stored_shapes(step_dir / "state")) | set(stored_shapes(step_dir / "extra"))
        assert not [k for k in keys if k.startswith(("extra/latent", "latent/", "dinov2/")) or "/dinov2/" in k], keys
    assert {k.split("/")[0] for k in stored_shapes(step_dir / "extra")} == {"latent_stats"}  # the FAE's (ii)
    # the FAE's trained variables are the flow's frozen part, not random placeholders
    restored = restore_workdir(tmp_path / "run")
    from starflow2_jax.train.tasks.latents import load_fae_variables

    fae_vars = load_fae_variables(workdirs["ii"])
    np.testing.assert_array_equal(np.asarray(restored.extra["latent"]["latent_stats"]["mean"]),
                                  np.asarray(fae_vars["latent_stats"]["mean"]))
    summary = sample_from_workdir(tmp_path / "run", tmp_path / "samples.png", label=3, num=2, seed=0,
                                  restored=restored)
    del summary
    images = np.load(tmp_path / "samples.npz")["images"]  # uint8, decoded by the FAE
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8


def load_config_json(workdir):
    import json

    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def test_flow_task_rejects_a_mismatched_latent_grid():
    cfg = flow.starflow_config(1, 8, 2, 32, layers_per_block=[1], head_dim=16)
    with pytest.raises(ValueError, match="latent space gives a"):
        FlowTask(cfg, latent_space=PatchesSpace(8, 8, 1, 2))

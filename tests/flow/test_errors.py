"""Bad input gets a clear error that names the value and what was expected."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from starflow2_jax import flow

CONFIG = flow.tarflow_config(3, 16, 4, 64, 2, 1, num_classes=10)
TEXT_CONFIG = flow.starflow_config(4, 8, 1, 64, layers_per_block=[1, 1], head_dim=32, txt_size=4, txt_dim=8)


@pytest.fixture(scope="module")
def variables():
    return flow.init(CONFIG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def text_variables():
    return flow.init(TEXT_CONFIG, jax.random.PRNGKey(0))


def test_config_image_size_not_divisible_by_patch():
    with pytest.raises(ValueError, match=r"image_size=\(30, 30\) is not divisible by patch_size=4"):
        flow.tarflow_config(3, 30, 4, 64, 2, 1)


def test_config_fields_named():
    with pytest.raises(ValueError, match="channels=96"):
        flow.tarflow_config(3, 16, 4, 96, 2, 1)
    with pytest.raises(ValueError, match="seq_order='up'"):
        flow.starflow_config(4, 8, 1, 64, layers_per_block=[1], seq_order="up")
    with pytest.raises(ValueError, match="norm='batchnorm'"):
        dataclasses.replace(CONFIG, norm="batchnorm").validate()
    with pytest.raises(ValueError, match=r"blocks\[1\].permutation='spiral'"):
        blocks = (CONFIG.blocks[0], dataclasses.replace(CONFIG.blocks[1], permutation="spiral"))
        dataclasses.replace(CONFIG, blocks=blocks).validate()


def test_image_size_not_divisible_by_patch(variables):
    with pytest.raises(ValueError, match="image size 18x18 is not divisible by patch_size=4"):
        flow.forward(CONFIG, variables, jnp.zeros((1, 18, 18, 3)), jnp.array([0]))


def test_image_size_mismatch(variables):
    with pytest.raises(ValueError, match=r"image size 8x8 does not match the config's image_size=\(16, 16\)"):
        flow.forward(CONFIG, variables, jnp.zeros((1, 8, 8, 3)), jnp.array([0]))


def test_wrong_channel_count(variables):
    with pytest.raises(ValueError, match="images have 1 channels, the config expects in_channels=3"):
        flow.forward(CONFIG, variables, jnp.zeros((1, 16, 16, 1)), jnp.array([0]))
    with pytest.raises(ValueError, match=r"NHWC \(B, H, W, C\), got shape \(16, 16, 3\)"):
        flow.forward(CONFIG, variables, jnp.zeros((16, 16, 3)), jnp.array([0]))


def test_bad_conditioning(variables, text_variables):
    with pytest.raises(ValueError, match="integer class labels of shape"):
        flow.forward(CONFIG, variables, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match="cond has 2 labels for a batch of 1"):
        flow.forward(CONFIG, variables, jnp.zeros((1, 16, 16, 3)), jnp.array([0, 1]))
    with pytest.raises(ValueError, match=r"text features of shape \(1, 4, 8\), got \(1, 5, 8\)"):
        flow.forward(TEXT_CONFIG, text_variables, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1, 5, 8)))
    with pytest.raises(ValueError, match="this flow is text-conditioned"):
        flow.forward(TEXT_CONFIG, text_variables, jnp.zeros((1, 8, 8, 4)))


def test_bad_sampling_arguments(variables, text_variables):
    noise = jnp.zeros((1, TEXT_CONFIG.num_tokens, TEXT_CONFIG.token_dim))
    text = jnp.zeros((1, 4, 8))
    with pytest.raises(ValueError, match="guidance with a text-conditioned flow needs uncond"):
        flow.sample(TEXT_CONFIG, text_variables, noise, text, guidance=2.0)
    with pytest.raises(ValueError, match=r"noise must have shape \(B, 64, 4\)"):
        flow.sample(TEXT_CONFIG, text_variables, jnp.zeros((1, 64, 5)), text)
    with pytest.raises(ValueError, match="jacobi threshold=-1"):
        flow.sample(TEXT_CONFIG, text_variables, noise, text, jacobi=dict(threshold=-1))
    with pytest.raises(TypeError, match="block"):
        flow.sample(TEXT_CONFIG, text_variables, noise, text, jacobi=dict(blocksize=4))
    with pytest.raises(ValueError, match="guide='c'"):
        flow.sample(CONFIG, variables, jnp.zeros((1, 16, 48)), jnp.array([0]), guidance=1.0, guide="c")


def test_config_json_round_trip_and_unknown_fields():
    import json
    for config in (CONFIG, TEXT_CONFIG):
        assert flow.config_from_dict(json.loads(json.dumps(flow.config_to_dict(config)))) == config
    with pytest.raises(ValueError, match=r"unknown FlowConfig fields: \['widht'\]"):
        flow.config_from_dict(dict(flow.config_to_dict(CONFIG), widht=3))

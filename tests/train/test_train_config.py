"""Config validation names the offending field."""

import pytest
from train_helpers import tiny_config

from starflow2_jax.train import validate


def test_tiny_config_is_valid():
    validate(tiny_config())
    validate(tiny_config(**{"model.conditioning": "label", "model.flow.kwargs.num_classes": 10}))


@pytest.mark.parametrize("overrides, field", [
    ({"model.flow.factory": "glow"}, "model.flow.factory"),
    ({"model.conditioning": "label"}, "model.flow.kwargs.num_classes"),
    ({"model.conditioning": "caption", "model.flow.factory": "tarflow"}, "model.flow.factory"),
    ({"model.flow.remat": "some"}, "model.flow.remat"),
    ({"data.noise": "gaussian"}, "data.noise_std"),
    ({"data.label_drop": 1.5}, "data.label_drop"),
    ({"train.grad_accum": 3}, "train.grad_accum"),
    ({"optim.min_lr": 1.0}, "optim.min_lr"),
    ({"optim.ema_decay": 1.0}, "optim.ema_decay"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, "mesh.fsdp"),
    ({"train.max_nonfinite_steps": 0}, "train.max_nonfinite_steps"),
    ({"sample.guidance": []}, "sample.guidance"),
    ({"data.builder": "directory"}, "data.data_dir"),
    ({"sample.image_temperature": 0.0}, "sample.image_temperature"),
    ({"sample.image_temperature": -0.5}, "sample.image_temperature"),
    ({"sample.image_temperature": float("nan")}, "sample.image_temperature"),
])
def test_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        validate(tiny_config(**overrides))


def test_image_temperature_must_be_a_number_and_is_for_starflow2_only():
    """tiny_config is a flow-family config: any temperature but 1.0 is refused, naming the field and the
    family; a string (a hand-edited stored config) is not a number."""
    validate(tiny_config(**{"sample.image_temperature": 1.0}))
    with pytest.raises(ValueError, match=r"sample\.image_temperature=0\.6: only model\.family in \('starflow2',\) "
                                         r"samples at an image temperature \(model\.family is 'flow'"):
        validate(tiny_config(**{"sample.image_temperature": 0.6}))
    config = tiny_config()
    with config.ignore_type():
        config.sample.image_temperature = "hot"
    with pytest.raises(ValueError, match=r"sample\.image_temperature='hot': expected a number"):
        validate(config)

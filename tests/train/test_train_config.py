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
])
def test_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        validate(tiny_config(**overrides))

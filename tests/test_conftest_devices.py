"""The suite runs on 8 fake CPU devices and finds the reference fixtures."""

import jax
import numpy as np


def test_eight_cpu_devices():
    devices = jax.devices()
    assert len(devices) == 8, devices
    assert all(d.platform == "cpu" for d in devices), devices
    assert jax.default_backend() == "cpu"


def test_reference_fixtures_load(tarflow_fixture, starflow_fixture):
    for fixture in (tarflow_fixture, starflow_fixture):
        assert any(key.startswith("sd/") for key in fixture)
        assert all(isinstance(value, np.ndarray) for value in fixture.values())
    assert tarflow_fixture["x"].shape == (4, 3, 32, 32)

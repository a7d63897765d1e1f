"""Shared data fixtures: the digits dataset is prepared once per test session."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def digits_builder(tmp_path_factory):
    """The ``starflow2_digits`` builder, prepared in a session temporary directory."""
    from starflow2_jax.data import build_digits

    return build_digits(tmp_path_factory.mktemp("tfds_digits"))


@pytest.fixture(scope="session")
def sklearn_digits():
    """``(images (1797, 8, 8) int64, targets (1797,) int64)`` straight from scikit-learn (the oracle)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.int64), digits.target.astype(np.int64)

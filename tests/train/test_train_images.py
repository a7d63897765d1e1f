"""Sample-grid images: tiling, panels, atomic PNG writes."""

import os

import numpy as np
import pytest
from PIL import Image

from starflow2_jax.train import images


def test_grid_panels_and_png(tmp_path):
    grid = np.linspace(-1, 1, 2 * 3 * 4 * 5 * 1).reshape(2, 3, 4, 5, 1)
    pixels = images.to_uint8(grid)
    assert pixels.dtype == np.uint8 and pixels.min() == 0 and pixels.max() == 255
    tiled = images.tile(pixels)
    assert tiled.shape == (2 * 5 + 1, 3 * 6 + 1, 1)
    np.testing.assert_array_equal(tiled[1:5, 1:6], pixels[0, 0])
    np.testing.assert_array_equal(tiled[6:10, 13:18], pixels[1, 2])
    joined = images.side_by_side([tiled, tiled])
    assert joined.shape == (11, 2 * 19 + 4, 1)
    path = images.save_png(tmp_path / "s" / "grid.png", joined, scale=2)
    with Image.open(path) as image:
        assert image.size == (2 * 42, 2 * 11)
        np.testing.assert_array_equal(np.asarray(image)[::2, ::2], joined[..., 0])
    assert os.listdir(tmp_path / "s") == ["grid.png"]  # no temporary file left behind
    assert images.to_uint8(np.array([np.nan, np.inf]))[0] == 0


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match=r"\(rows, cols, H, W, C\)"):
        images.tile(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="uint8"):
        images.save_png("x.png", np.zeros((2, 2, 1), np.float32))

"""eval.transcript_image: a transcript as one PNG (the README's interleaved picture)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from starflow2_jax.eval.transcript import Passage, Picture
from starflow2_jax.eval.transcript_image import FRAME, render_png, write_png


def _digit(value: int) -> np.ndarray:
    """An 8×8 grey uint8 image with a distinctive pattern (a ramp plus ``value``)."""
    return ((np.arange(64).reshape(8, 8, 1) * 3 + value) % 256).astype(np.uint8)


def _find(canvas: np.ndarray, block: np.ndarray) -> list[tuple[int, int]]:
    """Top-left corners where ``block`` occurs exactly in ``canvas`` (both (H, W, 3))."""
    h, w = block.shape[:2]
    hits = []
    for y, x in zip(*np.nonzero(np.all(canvas == block[0, 0], axis=-1))):
        if y + h <= canvas.shape[0] and x + w <= canvas.shape[1] and np.array_equal(canvas[y:y + h, x:x + w], block):
            hits.append((int(y), int(x)))
    return hits


def test_pictures_appear_magnified_in_document_order_with_their_frames():
    scale = 4
    parts = [Passage("Count from one to two.", prompt=True), Passage("one"), Picture(_digit(1)), Passage("two"),
             Picture(_digit(7), prompt=True)]
    canvas = np.asarray(render_png(parts, scale=scale, width=400))
    corners = []
    for value in (1, 7):  # the expected block: every pixel a scale × scale square, grey → RGB
        block = np.repeat(np.repeat(np.repeat(_digit(value), 3, axis=2), scale, axis=0), scale, axis=1)
        hits = _find(canvas, block)
        assert len(hits) == 1, value
        corners.append(hits[0])
    (y1, x1), (y7, x7) = corners
    assert (y1, x1) < (y7, x7) or y7 > y1  # left to right, then down
    assert tuple(canvas[y1 - 1, x1]) == FRAME[False] and tuple(canvas[y7 - 1, x7]) == FRAME[True]
    # text was drawn: dark pixels left of the first picture on its line, in the prompt's blue at the top
    assert np.any(np.all(canvas[:, :x1] < 60, axis=-1))
    assert np.any(np.all(canvas[: y1, :] == (40, 90, 170), axis=-1))


def test_float_pixels_and_wrapping_and_bad_input(tmp_path):
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8, 1)
    many = [Picture(x) for _ in range(10)]
    narrow = render_png(many, scale=5, width=150)
    wide = render_png(many, scale=5, width=1000)
    assert narrow.height > wide.height and narrow.width == 150  # wrapped onto more lines
    path = write_png(tmp_path / "t.png", many, scale=5, width=150)
    with Image.open(path) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(narrow))
    with pytest.raises(ValueError, match=r"expected Passage or Picture"):
        render_png(["text"])
    with pytest.raises(ValueError, match=r"shape \(8, 8\)"):
        render_png([Picture(np.zeros((8, 8)))])
    with pytest.raises(ValueError, match=r"width=40"):
        render_png([Picture(x)], scale=6, width=40)
    with pytest.raises(ValueError, match=r"scale=0"):
        render_png([Picture(x)], scale=0)
    assert not (tmp_path / "bad.png").exists()

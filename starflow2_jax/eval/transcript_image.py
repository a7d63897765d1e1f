"""A transcript (``eval.transcript`` parts) as one PNG picture: what the README shows of an interleaved
document, where HTML cannot go.

    picture = render_png(parts, scale=6)        # PIL.Image (RGB)
    write_png("docs/demo_interleaved.png", parts)

Parts are laid out left to right in document order and wrapped into lines of at most ``width`` pixels:
a ``Passage`` is its text in PIL's built-in bitmap font (newlines break the line; prompt text in blue,
generated text in black), a ``Picture`` its pixels magnified ``scale`` times (nearest neighbour, so every
pixel stays a visible square) with a thin frame (blue: given in the prompt, grey: generated). The
picture is written through ``atomic``: complete or not at all.
"""

from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np

from starflow2_jax import atomic
from starflow2_jax.eval.transcript import Passage, Picture, image_uint8

PROMPT_COLOUR = (40, 90, 170)
TEXT_COLOUR = (20, 20, 20)
FRAME = {True: PROMPT_COLOUR, False: (150, 150, 150)}
BACKGROUND = (255, 255, 255)


def _pixels(part: Picture, scale: int) -> np.ndarray:
    """(H·scale, W·scale, 3) uint8 of a picture part."""
    image = image_uint8(part.pixels)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def _tokens(parts: Sequence, scale: int):
    """Yields the layout's boxes in order: ('text', str, colour) per word, ('break',) per newline and
    ('image', (h, w, 3) uint8, frame colour) per picture."""
    for index, part in enumerate(parts):
        if isinstance(part, Passage):
            colour = PROMPT_COLOUR if part.prompt else TEXT_COLOUR
            for k, line in enumerate(part.text.split("\n")):
                if k:
                    yield ("break",)
                for word in line.split():
                    yield ("text", word, colour)
        elif isinstance(part, Picture):
            yield ("image", _pixels(part, scale), FRAME[bool(part.prompt)])
        else:
            raise ValueError(f"transcript part {index} of type {type(part).__name__}: expected Passage or Picture")


def render_png(parts: Sequence, *, scale: int = 6, width: int = 720, margin: int = 8, gap: int = 6):
    """The PIL ``Image`` (RGB) of ``parts`` laid out as the module docstring says. ValueError for a part
    of another type, a bad image, or ``scale`` / ``width`` too small to hold an image."""
    from PIL import Image, ImageDraw, ImageFont

    if scale < 1:
        raise ValueError(f"scale={scale}: expected an int >= 1")
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = []
    for token in _tokens(parts, scale):
        if token[0] == "text":
            left, top, right, bottom = measure.textbbox((0, 0), token[1], font=font)
            boxes.append((token, right - left, bottom - top + 2))
        elif token[0] == "image":
            h, w = token[1].shape[:2]
            if w + 2 + 2 * margin > width:
                raise ValueError(f"width={width}: an image {w} pixels wide (scale {scale}) does not fit")
            boxes.append((token, w + 2, h + 2))
        else:
            boxes.append((token, 0, 0))
    lines, line, x = [], [], margin
    for box in boxes:
        if box[0][0] == "break" or (line and x + box[1] > width - margin):
            lines.append(line)
            line, x = [], margin
            if box[0][0] == "break":
                continue
        line.append((x, box))
        x += box[1] + gap
    lines.append(line)
    heights = [max((b[2] for _, b in ln), default=10) for ln in lines]
    canvas = Image.new("RGB", (width, margin * 2 + sum(heights) + gap * (len(lines) - 1)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = margin
    for ln, height in zip(lines, heights):
        for x, (token, w, h) in ln:
            top = y + (height - h) // 2
            if token[0] == "text":
                draw.text((x, top), token[1], fill=token[2], font=font)
            else:
                draw.rectangle([x, top, x + w - 1, top + h - 1], outline=token[2])
                canvas.paste(Image.fromarray(token[1]), (x + 1, top + 1))
        y += height + gap
    return canvas


def write_png(path: os.PathLike | str, parts: Sequence, **kwargs) -> str:
    """Writes ``render_png(parts, **kwargs)`` to ``path`` (rendered first, then written atomically);
    returns the path."""
    buffer = io.BytesIO()
    render_png(parts, **kwargs).save(buffer, format="PNG")
    return atomic.write_bytes(path, buffer.getvalue())

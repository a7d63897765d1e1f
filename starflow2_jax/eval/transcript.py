"""A self-contained HTML transcript of an interleaved document (text and images, in order).

    parts = [Passage("Draw a cat.", prompt=True), Picture(pixels, meta={"guidance": 3.0, "seed": 0}),
             Passage("Here is the cat.")]
    write_transcript("out/transcript.html", parts, title="starflow2 generate")

Text passages are HTML-escaped (newlines kept); images are embedded as base64 PNG ``<img>`` tags (so the
file can be copied anywhere), each in a ``<figure>`` whose caption lists its metadata (guidance, seed,
…). Parts of the prompt carry the class ``prompt`` (and a "prompt" label); generated parts carry
``generated``. Every part is one element ``<div class="part …" data-kind="text|image" data-index=k>``
in document order, so a reader (or a test) can walk the file back. ``from_sequence`` splits a
generated Pretzel document (``pretzel.interleaved``'s ``sequence``) into parts. The file is written
through ``atomic``: complete or not at all.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from starflow2_jax import atomic
from starflow2_jax.train.images import to_uint8

# the parts' look, also for a page that embeds parts (``render_parts``; the digits demo's report)
PART_STYLE = """
.part { margin: 0.75rem 0; }
.prompt { border-left: 4px solid #3b6fb6; padding-left: 0.75rem; background: #f2f6fc; }
.generated { border-left: 4px solid #999; padding-left: 0.75rem; }
.label { font-size: 0.75rem; text-transform: uppercase; color: #3b6fb6; letter-spacing: 0.05em; }
.text { white-space: pre-wrap; margin: 0; }
figure { margin: 0; } figure img { image-rendering: pixelated; border: 1px solid #ccc; min-width: 8rem; }
figcaption { font-size: 0.8rem; color: #555; }
"""
_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 50rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
""" + PART_STYLE


@dataclasses.dataclass(frozen=True)
class Passage:
    """A text segment of the document; ``prompt``: it was given, not generated."""

    text: str
    prompt: bool = False


@dataclasses.dataclass(frozen=True)
class Picture:
    """An image (H, W, C), C in {1, 3}: float in [−1, 1] (the models' range) or uint8; ``prompt``: given,
    not generated; ``meta``: what to show under it (e.g. guidance, seed, jacobi)."""

    pixels: Any
    prompt: bool = False
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def image_uint8(pixels) -> np.ndarray:
    """An image of a ``Picture`` as (H, W, C) uint8. ValueError for another shape or dtype."""
    image = np.asarray(pixels)
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"transcript image of shape {image.shape}: expected (H, W, 1|3)")
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.floating):
            raise ValueError(f"transcript image of dtype {image.dtype}: expected float in [-1, 1] or uint8")
        image = to_uint8(image)
    return image


def png_bytes(pixels) -> bytes:
    """The PNG encoding of an image (see ``Picture``). ValueError for another shape or dtype."""
    from PIL import Image

    image = image_uint8(pixels)
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def _part(index: int, part) -> str:
    if not isinstance(part, (Passage, Picture)):
        raise ValueError(f"transcript part {index} of type {type(part).__name__}: expected Passage or Picture")
    origin = "prompt" if part.prompt else "generated"
    label = f'<div class="label">{origin}</div>'
    if isinstance(part, Passage):
        body = f'<p class="text">{html.escape(part.text)}</p>'
        kind = "text"
    else:
        data = base64.b64encode(png_bytes(part.pixels)).decode("ascii")
        meta = ", ".join(f"{html.escape(str(k))}={html.escape(str(v))}" for k, v in part.meta.items())
        caption = f"<figcaption>{meta}</figcaption>" if meta else ""
        body = (f'<figure><img src="data:image/png;base64,{data}" alt="image {index} ({origin})">'
                f"{caption}</figure>")
        kind = "image"
    return f'<div class="part {origin}" data-kind="{kind}" data-index="{index}">{label}{body}</div>'


def render_parts(parts: Sequence) -> str:
    """The HTML (str) of ``parts`` (``Passage`` / ``Picture``, in document order): one ``<div class="part
    …">`` each, styled by ``PART_STYLE``; for embedding in another page."""
    return "\n".join(_part(i, p) for i, p in enumerate(parts))


def render_transcript(parts: Sequence, *, title: str = "STARFlow2 transcript") -> str:
    """The HTML page (str) of ``parts`` (``Passage`` / ``Picture``, in document order)."""
    body = render_parts(parts)
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n"
            f"<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def write_transcript(path: os.PathLike | str, parts: Sequence, *, title: str = "STARFlow2 transcript") -> str:
    """Writes ``render_transcript(parts)`` to ``path`` atomically (every part is rendered before anything
    is written, so a bad part leaves no file); returns the path."""
    return atomic.write_text(path, render_transcript(parts, title=title))


def from_sequence(tokens, *, vision_start: int, vision_end: int, image_token: int, decode: Callable[[list], str],
                  images: Sequence, prompt_length: int = 0, meta: Sequence[Mapping] | None = None) -> list:
    """A generated document's token sequence (T,) → transcript parts.

    Text runs between images become ``Passage``s (``decode(ids)``; marker and slot tokens dropped); each
    ``<|vision_start|>`` … ``<|vision_end|>`` becomes a ``Picture`` of the next entry of ``images``
    (every image of the document, prompt images first, (H, W, C) each) with ``meta[k]``. Tokens before
    ``prompt_length`` (and images starting there) are marked as the prompt; a text run that crosses it
    is split. Raises ValueError when the count of images differs from the document's.
    """
    tokens = [int(t) for t in np.asarray(tokens).ravel().tolist()]
    starts = [i for i, t in enumerate(tokens) if t == vision_start]
    if len(starts) != len(images):
        raise ValueError(f"the sequence holds {len(starts)} images but {len(images)} were given")
    if meta is not None and len(meta) != len(images):
        raise ValueError(f"meta has {len(meta)} entries: expected one per image ({len(images)})")
    parts, run, run_prompt, k = [], [], None, 0

    def flush():
        nonlocal run
        if run:
            parts.append(Passage(decode(run), prompt=run_prompt))
        run = []

    inside = False
    for i, t in enumerate(tokens):
        in_prompt = i < prompt_length
        if t == vision_start:
            flush()
            parts.append(Picture(images[k], prompt=in_prompt, meta=dict(meta[k]) if meta is not None else {}))
            k += 1
            inside = True
            continue
        if inside:
            inside = t != vision_end
            continue
        if t == image_token:
            continue
        if run and run_prompt != in_prompt:
            flush()
        run_prompt = in_prompt
        run.append(t)
    flush()
    return parts

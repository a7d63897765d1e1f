"""The HTML transcript of an interleaved document, read back with ``html.parser``: parts in order, the
prompt marked, text escaped, and every embedded PNG decoding to the pixels given (uint8 rounding
written out here)."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from starflow2_jax.eval import transcript


class _Reader(HTMLParser):
    """Collects the parts: (kind, classes, text, image pixels or None, caption)."""

    def __init__(self):
        super().__init__()
        self.parts, self._field = [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and "part" in attrs.get("class", "").split():
            self.parts.append(dict(kind=attrs["data-kind"], index=int(attrs["data-index"]),
                                   classes=attrs["class"].split(), text="", image=None, caption=""))
        elif tag == "p" and attrs.get("class") == "text":
            self._field = "text"
        elif tag == "figcaption":
            self._field = "caption"
        elif tag == "img":
            src = attrs["src"]
            assert src.startswith("data:image/png;base64,")
            png = base64.b64decode(src.split(",", 1)[1])
            self.parts[-1]["image"] = np.asarray(Image.open(io.BytesIO(png)))
        elif tag in ("b", "script"):
            raise AssertionError(f"unescaped <{tag}> in the transcript")

    def handle_endtag(self, tag):
        if tag in ("p", "figcaption"):
            self._field = None

    def handle_data(self, data):
        if self._field:
            self.parts[-1][self._field] += data


def _read(path) -> list[dict]:
    reader = _Reader()
    with open(path, encoding="utf-8") as f:
        reader.feed(f.read())
    return reader.parts


def _expected_uint8(x):
    return np.clip(np.floor((np.asarray(x, np.float64) + 1.0) * 127.5 + 0.5), 0, 255).astype(np.uint8)


def test_transcript_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.uniform(-1, 1, (6, 5, 3)).astype(np.float32)
    gray = rng.uniform(-1, 1, (4, 4, 1)).astype(np.float32)
    raw = rng.integers(0, 256, (3, 7, 3)).astype(np.uint8)
    parts = [transcript.Passage("Draw <b>two</b> cats & a dog.\nPlease.", prompt=True),
             transcript.Picture(raw, prompt=True),
             transcript.Passage("Here is the first:"),
             transcript.Picture(rgb, meta={"guidance": 3.0, "seed": 7}),
             transcript.Picture(gray, meta={"guidance": 0.0, "seed": 8}),
             transcript.Passage("Done.")]
    path = transcript.write_transcript(tmp_path / "t.html", parts, title="a <test>")
    got = _read(path)
    assert [p["kind"] for p in got] == ["text", "image", "text", "image", "image", "text"]
    assert [p["index"] for p in got] == list(range(6))
    assert [("prompt" in p["classes"], "generated" in p["classes"]) for p in got] == \
        [(True, False), (True, False), (False, True), (False, True), (False, True), (False, True)]
    assert got[0]["text"] == "Draw <b>two</b> cats & a dog.\nPlease."
    assert got[2]["text"] == "Here is the first:" and got[5]["text"] == "Done."
    np.testing.assert_array_equal(got[1]["image"], raw)
    np.testing.assert_array_equal(got[3]["image"], _expected_uint8(rgb))
    np.testing.assert_array_equal(got[4]["image"], _expected_uint8(gray)[..., 0])
    assert got[3]["caption"] == "guidance=3.0, seed=7" and got[4]["caption"] == "guidance=0.0, seed=8"
    assert got[1]["caption"] == ""


def test_bad_part_writes_nothing(tmp_path):
    target = tmp_path / "t.html"
    for bad in ([transcript.Passage("a"), "a bare string"],
                [transcript.Picture(np.zeros((4, 4, 2), np.float32))],
                [transcript.Picture(np.zeros((4, 4, 3), np.int32))]):
        with pytest.raises(ValueError):
            transcript.write_transcript(target, bad)
        assert list(tmp_path.iterdir()) == []


def test_from_sequence_splits_text_images_and_prompt():
    start, end, pad = 250, 251, 252
    # prompt: text 1 2, an image; generated: text 3 4, an image, text 5
    tokens = [1, 2, start, pad, pad, end, 3, 4, start, pad, pad, end, 5]
    images = [np.zeros((2, 2, 1), np.float32), np.ones((2, 2, 1), np.float32)]
    parts = transcript.from_sequence(tokens, vision_start=start, vision_end=end, image_token=pad,
                                     decode=lambda ids: ",".join(map(str, ids)), images=images, prompt_length=7,
                                     meta=[{}, {"seed": 3}])
    kinds = [(type(p).__name__, p.prompt) for p in parts]
    assert kinds == [("Passage", True), ("Picture", True), ("Passage", True), ("Passage", False),
                     ("Picture", False), ("Passage", False)]
    assert [p.text for p in parts if isinstance(p, transcript.Passage)] == ["1,2", "3", "4", "5"]
    assert parts[4].pixels is images[1] and parts[4].meta == {"seed": 3}
    with pytest.raises(ValueError, match="holds 2 images but 1"):
        transcript.from_sequence(tokens, vision_start=start, vision_end=end, image_token=pad, decode=str,
                                 images=images[:1])

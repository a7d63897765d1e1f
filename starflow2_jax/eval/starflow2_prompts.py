"""The STARFlow2 digits demo's prompts and the parsers of what the model answers.

A prompt is a stage-3 training document (``data.digits_documents.document_space``: the ``demo_text``
wordings, never retyped) cut where the model takes over, laid out as training lays it out
(``document_items`` → ``pretzel.layout_document``, the same text segments, so the same tokens — tested
against documents the training pipeline draws). Chat documents open with the system turn; the cut is

    'answer'  after ``<|im_start|>assistant\n``: the model writes the whole assistant turn;
    'image'   before the assistant's first image: what the assistant says before it is given.

Each builder returns ``pretzel.layout_document``'s dict:

    draw_prompt(config, encode, digit)           "draw the digit seven", cut at 'answer' (the model names the
                                                 digit, then opens the image; ``cut='image'``: word given)
    question_prompt(config, encode, pixels)      image (context) + "What digit is this?", cut at 'answer'
    next_digit_prompt(config, encode, pixels)    image of d (context) + "Draw the next digit.", cut at 'answer'
    counting_prompt(config, encode, text)        a counting prompt, cut at 'answer'

What the training data defines, read from it rather than restated: ``next_digit_target(d)`` (the digit
the next-digit documents draw after d) and ``counting_expectation(prompt)`` (the numbers a counting
prompt's documents answer, in order). Parsers: ``parse_answer(text)`` (the digit a one-word answer
names, or None) and ``parse_interleaved(tokens, ...)`` (a generated assistant turn → its text runs and
images, and whether it has the expected structure).
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np

from starflow2_jax import pretzel
from starflow2_jax.data import demo_text as dt
from starflow2_jax.data import digits_documents as dd

CUTS = ("answer", "image")


def training_document(kind: str, wanted: Callable[[dt.DemoDocument], bool] = lambda d: True) -> dt.DemoDocument:
    """The first document of ``kind`` the stage-3 data can draw (``document_space(kind, 'mixed')``) for
    which ``wanted(document)``; ValueError when there is none."""
    for document in dd.document_space(kind, "mixed"):
        if wanted(document):
            return document
    raise ValueError(f"no {kind!r} training document is the one asked for")


def _user_text(document: dt.DemoDocument) -> list[str]:
    return [i for i in document.turns[0][1] if isinstance(i, str)]


def training_prefix(config: pretzel.PretzelConfig, encode: Callable, document: dt.DemoDocument,
                    images: Sequence[np.ndarray] = (), *, cut: str) -> dict:
    """``document`` laid out as training lays it out, up to ``cut`` ('answer' / 'image', module
    docstring). images: (H, W, C) pixels in [−1, 1] for its images in order (those after the cut may be
    left out)."""
    if cut not in CUTS:
        raise ValueError(f"cut={cut!r}: expected one of {CUTS}")
    if not document.chat:
        raise ValueError(f"a {document.kind!r} document is not a chat: it has no assistant turn to cut at")
    blank = np.zeros(tuple(config.latent.image_shape), np.float32)
    pixels = list(images) + [blank] * (len(document.digits) - len(images))
    items = dd.document_items(document, pixels)
    opened = next(i for i, item in enumerate(items) if item.get("text") == f"{dt.IM_START}assistant\n")
    end = opened + 1
    if cut == "image":
        end = next(i for i in range(opened, len(items)) if "image" in items[i])
    kept = [pretzel.Text(i["text"], loss=i["loss"]) if "text" in i else
            pretzel.Image(np.asarray(i["image"], np.float32), target=i["target"]) for i in items[:end]]
    return pretzel.layout_document(config, kept, encode=encode)


def draw_prompt(config: pretzel.PretzelConfig, encode: Callable, digit: int, *, cut: str = "answer") -> dict:
    """``DRAW_PROMPT`` for ``digit`` (0..9), cut at the assistant turn (the model writes
    ``demo_text.drawing_text``, then draws) or, ``cut='image'``, before the assistant's image (that text given)."""
    if isinstance(digit, bool) or not isinstance(digit, (int, np.integer)) or not 0 <= digit < 10:
        raise ValueError(f"digit {digit!r}: expected 0..9")
    words = dt.DRAW_PROMPT.format(name=dt.NUMBER_WORDS[int(digit)])
    document = training_document("draw", lambda d: _user_text(d) == [words] and d.digits == [int(digit)])
    return training_prefix(config, encode, document, cut=cut)


def question_prompt(config: pretzel.PretzelConfig, encode: Callable, pixels: np.ndarray) -> dict:
    """An image (H, W, C) in [−1, 1] and ``QUESTION`` in the user turn, cut at the answer."""
    document = training_document("question", lambda d: _user_text(d) == [dt.QUESTION])
    return training_prefix(config, encode, document, [pixels], cut="answer")


def next_digit_prompt(config: pretzel.PretzelConfig, encode: Callable, pixels: np.ndarray) -> dict:
    """An image (H, W, C) in [−1, 1] and ``NEXT_DIGIT_PROMPT`` in the user turn, cut at the answer."""
    document = training_document("next_digit", lambda d: _user_text(d) == [dt.NEXT_DIGIT_PROMPT])
    return training_prefix(config, encode, document, [pixels], cut="answer")


def counting_prompt(config: pretzel.PretzelConfig, encode: Callable, text: str) -> dict:
    """A counting prompt (one of ``INTERLEAVED_PROMPTS``) in the user turn, cut at the answer."""
    document = training_document("interleaved", lambda d: _user_text(d) == [text])
    return training_prefix(config, encode, document, cut="answer")


def next_digit_target(digit: int) -> int:
    """The digit the training documents of kind 'next_digit' draw after an image of ``digit``."""
    targets = {doc.digits[0]: doc.digits[1] for doc in dd.document_space("next_digit", "mixed")}
    if int(digit) not in targets:
        raise ValueError(f"digit {digit!r}: expected one of {sorted(targets)}")
    return targets[int(digit)]


def counting_expectation(prompt: str) -> list[int]:
    """The numbers (in order) the assistant answers a counting ``prompt`` with in the training documents
    of kind 'interleaved' (each as ``demo_text.drawing_text``, then an image of it). ValueError when no training document
    asks ``prompt``."""
    for doc in dd.document_space("interleaved", "mixed"):
        (_, (asked,)), _ = doc.turns
        if asked == prompt:
            return list(doc.digits)
    raise ValueError(f"counting prompt {prompt!r}: no 'interleaved' training document asks it (expected a "
                     f"demo_text.COUNT_UP / COUNT_DOWN / COUNT_EVEN wording the data draws)")


_WORD = re.compile(r"[a-z]+")


def parse_answer(text: str) -> int | None:
    """The digit (0..9) an answer names: the number its number words (``demo_text.NUMBER_WORDS``) name —
    one word, or the same word repeated, as in ``demo_text.drawing_text`` ("seven, a handwritten seven") —
    markers such as ``<|im_end|>`` and punctuation ignored, case-insensitive. None when it names no
    number, two different ones, or a number above nine."""
    words = _WORD.findall(_without_markers(text).lower())
    numbers = {dt.NUMBER_WORDS.index(w) for w in words if w in dt.NUMBER_WORDS}
    if len(numbers) != 1 or min(numbers) > 9:
        return None
    return numbers.pop()


def _without_markers(text: str) -> str:
    """``text`` without the chat and vision markers of ``demo_text`` (``<|im_end|>``, ...)."""
    for marker in (dt.IM_START, dt.IM_END, dt.VISION_START, dt.VISION_END, dt.IMAGE_PAD):
        text = text.replace(marker, " ")
    return text


def parse_interleaved(tokens: Sequence[int], *, decode: Callable[[list], str], vision_start: int, vision_end: int,
                      end_tokens: Sequence[int], expected: Sequence[int]) -> dict:
    """A generated assistant turn (the tokens after the prompt) against the expected counting answer.

    The turn is split into text runs and images (``<|vision_start|>`` … ``<|vision_end|>``). The right
    structure is: for each expected number in order, a text run that is exactly what the training documents
    say before drawing it (``demo_text.drawing_text``, surrounding whitespace ignored) followed by exactly one
    image; then a
    final text run of end tokens only (``<|im_end|>``). Returns ``dict(ok, reason (None when ok), words
    [the decoded text run before each image], labels [per image: the digit its preceding run names
    (``parse_answer``), or None], images (count))``.
    """
    end_tokens = {int(t) for t in end_tokens}
    pieces: list = []  # ('text', [ids]) / ('image', None)
    inside, run = False, []
    for t in (int(t) for t in tokens):
        if inside:
            inside = t != vision_end
            continue
        if t == vision_start:
            pieces.append(("text", run))
            pieces.append(("image", None))
            run, inside = [], True
            continue
        run.append(t)
    pieces.append(("text", run))
    words = [decode(pieces[i - 1][1]).strip() for i, p in enumerate(pieces) if p[0] == "image"]
    labels = [parse_answer(w) for w in words]
    result = dict(words=words, labels=labels, images=len(words), ok=False, reason=None)
    texts = [p[1] for p in pieces if p[0] == "text"]  # one more than the images
    expected = [dt.drawing_text(int(n)) for n in expected]
    if inside:
        result["reason"] = "unfinished image"
    for k, want in enumerate(expected):
        if result["reason"]:
            break
        if k >= len(words):
            got = decode(texts[k]).strip()
            result["reason"] = (f"image {k + 1} missing (after {want!r})"
                                if decode([t for t in texts[k] if t not in end_tokens]).strip() == want else
                                f"text {got!r} where {want!r} and an image were expected")
        elif words[k] != want:
            result["reason"] = f"word {k + 1} is {words[k]!r}: expected {want!r}"
    if not result["reason"] and len(words) > len(expected):
        result["reason"] = f"{len(words)} images: expected {len(expected)}"
    if not result["reason"]:
        tail = texts[len(expected)]
        if not tail or any(t not in end_tokens for t in tail):
            result["reason"] = (f"extra text {decode(tail)!r} before the end of turn" if any(
                t not in end_tokens for t in tail) else "no end of turn")
    result["ok"] = result["reason"] is None
    return result

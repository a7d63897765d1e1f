"""The digits demo's text: a corpus generated from templates (seeded) and the prompt wordings, in one place.

The demo's "pretrained VLM" (stage 0) is a tiny Qwen2.5-VL language model trained on this corpus;
stages 1–3 and the demo's scoring use the same wordings, so every prompt the demo asks is one the
language model has read. A **document** (``DemoDocument``) is one of

    plain   one turn of items (role 'text'): caption → image, image → caption, counting and
            arithmetic sentences — what a pretraining corpus holds;
    chat    user / assistant turns in Qwen2.5-VL's chat template (system turn first): draw a digit,
            answer "What digit is this?", count while drawing each number, draw the next digit.

Items are strings and ``DigitImage(digit)`` placeholders. ``render(document, num_slots)`` writes a
document as the text the language model reads: an image is ``<|vision_start|>``, ``num_slots`` ×
``<|image_pad|>``, ``<|vision_end|>`` and a chat turn is ``<|im_start|>role\\n`` … ``<|im_end|>\\n`` —
exactly the token structure of ``pretzel.layout_document`` / ``pretzel.chat_items`` (tested against
them; this leaf module cannot import the model packages).

Kinds (``KINDS``): 'caption', 'draw', 'question', 'counting', 'arithmetic', 'interleaved',
'next_digit'. ``demo_corpus(seed, num_documents)`` draws kinds and their fillers with one numpy
generator, so a seed gives the same corpus everywhere; ``corpus_summary`` is what the demo prints.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Iterator, Mapping, Sequence

import numpy as np

from starflow2_jax.data.digits import DIGIT_NAMES, digit_captions

# ---- the wordings stages 1–3 and the scoring import ---------------------------------------------
NUMBER_WORDS = DIGIT_NAMES + ("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                              "seventeen", "eighteen")
DRAW_PROMPT = "draw the digit {name}"  # text → image, scored (issue 11)
DRAW_PROMPTS = (DRAW_PROMPT, "Draw a handwritten {name}.", "please draw the number {name}", "draw a {digit}")
QUESTION = "What digit is this?"  # understanding, scored; the answer is the digit's word alone
ANSWER = "{name}"
COUNT_UP = "Count from {start} to {end}, drawing each number."
COUNT_DOWN = "Count down from {start} to {end}, drawing each number."
COUNT_EVEN = "Count by twos from {start} to {end}, drawing each number."
# interleaved generation, scored: the assistant answers drawing_text(n) + image for each number, in order
INTERLEAVED_PROMPTS = (COUNT_UP.format(start="one", end="four"), COUNT_DOWN.format(start="nine", end="six"),
                       COUNT_EVEN.format(start="two", end="eight"))
NEXT_DIGIT_PROMPT = "Draw the next digit."  # editing / visual reasoning, scored: an image of (d + 1) mod 10
# The assistant names each digit it draws twice, then draws it ("seven, a handwritten seven", image;
# ``DRAWING``), in every chat kind. The deep flow reads the frozen language model's last hidden states
# (SPEC §5), and a language model this small keeps almost nothing of a word in the last state AT the word
# (cosine 0.99 between "draw the digit three" and "… seven"): its last state holds the digit only where the
# NEXT word is the digit. Without a word before the image the flow learnt no conditioning in the demo's
# budget (likelihood classification at chance after 400 steps; 25% with it). Named once, the word is
# predictable (hence held) only where the prompt already named it ("draw the digit seven" → "seven"); after
# "Draw the next digit." the frozen model cannot know it, and images drawn there after the right word were
# at chance (9–13% after stage 1). The second naming is predictable from the first in every context: with
# it they were 21–22%, as after "draw the digit …" (stage 1, 600 steps, guidance 2).
DRAWING = "{name}, a handwritten {name}"
EXTRA_CAPTIONS = ("a handwritten {name}", "the digit {digit}", "the digit {name}", "a picture of the number {name}")

# ---- the token structure (Qwen2.5-VL's markers; pretzel.layout's) ------------------------------
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
DEFAULT_SYSTEM = "You are a helpful assistant."  # pretzel.layout.DEFAULT_SYSTEM (checked by the tests)
ROLES = ("text", "user", "assistant")
KINDS = ("caption", "draw", "question", "counting", "arithmetic", "interleaved", "next_digit")
# relative frequencies: the kinds with images carry most of what stages 1-3 ask
KIND_WEIGHTS = {"caption": 3.0, "draw": 2.0, "question": 2.0, "counting": 2.0, "arithmetic": 2.0,
                "interleaved": 2.0, "next_digit": 1.0}
MAX_INTERLEAVED_IMAGES = 4


@dataclasses.dataclass(frozen=True)
class DigitImage:
    """A placeholder for an image of ``digit`` (0..9): real or drawn, the language model sees only slots."""

    digit: int


@dataclasses.dataclass(frozen=True)
class DemoDocument:
    """One document: ``kind`` (one of ``KINDS``) and ``turns``, ``((role, items), ...)``.

    A plain document is one turn of role 'text'; a chat document has 'user' / 'assistant' turns
    (the system turn is added by ``render``). Items are strings and ``DigitImage``s.
    """

    kind: str
    turns: tuple[tuple[str, tuple], ...]

    @property
    def chat(self) -> bool:
        return self.turns[0][0] != "text"

    @property
    def digits(self) -> list[int]:
        """The digits of the document's images, in reading order."""
        return [item.digit for _, items in self.turns for item in items if isinstance(item, DigitImage)]


def image_placeholder(num_slots: int) -> str:
    """The text of one image: ``<|vision_start|>`` + ``num_slots`` × ``<|image_pad|>`` + ``<|vision_end|>``."""
    if isinstance(num_slots, bool) or not isinstance(num_slots, (int, np.integer)) or num_slots < 1:
        raise ValueError(f"num_slots={num_slots!r}: expected a positive int (the latent grid's h·w)")
    return VISION_START + IMAGE_PAD * int(num_slots) + VISION_END


def render(document: DemoDocument, num_slots: int, *, system: str | None = DEFAULT_SYSTEM) -> str:
    """The document as the language model reads it (see the module docstring); chat documents open
    with the system turn (``system=None``: none), as ``pretzel.chat_items`` writes them."""
    image = image_placeholder(num_slots)
    pieces = []
    if document.chat and system is not None:
        pieces.append(f"{IM_START}system\n{system}{IM_END}\n")
    for role, items in document.turns:
        body = "".join(image if isinstance(item, DigitImage) else item for item in items)
        pieces.append(body if role == "text" else f"{IM_START}{role}\n{body}{IM_END}\n")
    return "".join(pieces)


_MARKERS = re.compile("|".join(re.escape(m) for m in (IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD)))


def text_pieces(documents: Sequence[DemoDocument]) -> Iterator[str]:
    """The text between the special markers of every rendered document (what a tokenizer trains on)."""
    for document in documents:
        for piece in _MARKERS.split(render(document, 1)):
            if piece:
                yield piece


# ---- the generators of each kind ---------------------------------------------------------------
def _name(d: int) -> str:
    return NUMBER_WORDS[d]


def _fill(template: str, d: int) -> str:
    return template.format(name=_name(d), digit=d)


def _caption(rng: np.random.Generator) -> DemoDocument:
    d = int(rng.integers(10))
    captions = digit_captions(d) + [_fill(t, d) for t in EXTRA_CAPTIONS]
    caption = captions[int(rng.integers(len(captions)))]
    # stage 1 reads pairs caption → image, stage 2 image → caption
    items = (caption, DigitImage(d)) if rng.random() < 0.6 else (DigitImage(d), caption)
    return DemoDocument("caption", (("text", items),))


def drawing_text(d: int) -> str:
    """What the assistant says before it draws digit ``d`` (``DRAWING``)."""
    return DRAWING.format(name=_name(d))


def drawing(d: int) -> tuple:
    """The assistant's items that draw digit ``d``: ``drawing_text(d)``, then the image."""
    return drawing_text(d), DigitImage(d)


def draw_document(prompt: str, d: int) -> DemoDocument:
    """User ``prompt`` (a DRAW_PROMPTS wording) → the assistant draws ``d``."""
    return DemoDocument("draw", (("user", (prompt,)), ("assistant", drawing(d))))


def next_digit_document(d: int) -> DemoDocument:
    """User: an image of ``d`` and NEXT_DIGIT_PROMPT → the assistant draws (d + 1) mod 10."""
    return DemoDocument("next_digit", (("user", (DigitImage(d), NEXT_DIGIT_PROMPT)), ("assistant", drawing((d + 1) % 10))))


def _draw(rng: np.random.Generator) -> DemoDocument:
    d = int(rng.integers(10))
    return draw_document(_fill(DRAW_PROMPTS[int(rng.integers(len(DRAW_PROMPTS)))], d), d)


def _question(rng: np.random.Generator) -> DemoDocument:
    roll = rng.random()
    if roll < 0.5:  # about an image: the answer is the digit's word
        d = int(rng.integers(10))
        return DemoDocument("question", (("user", (DigitImage(d), QUESTION)),
                                         ("assistant", (ANSWER.format(name=_name(d)),))))
    if roll < 0.75:
        d = int(rng.integers(9))
        q, a = f"What number comes after {_name(d)}?", _name(d + 1)
    else:
        d = int(rng.integers(1, 10))
        q, a = f"What number comes before {_name(d)}?", _name(d - 1)
    return DemoDocument("question", (("user", (q,)), ("assistant", (a,))))


def _counting(rng: np.random.Generator) -> DemoDocument:
    length = int(rng.integers(3, 7))
    if rng.random() < 0.7:
        start = int(rng.integers(0, 10))
        numbers = range(start, start + length)
    else:
        start = int(rng.integers(length - 1, 10))
        numbers = range(start, start - length, -1)
    sentence = ", ".join(_name(n) for n in numbers)
    return DemoDocument("counting", (("text", (sentence[0].upper() + sentence[1:] + "." if rng.random() < 0.5
                                               else sentence,)),))


def _arithmetic(rng: np.random.Generator) -> DemoDocument:
    a, b = (int(v) for v in rng.integers(0, 10, size=2))
    if rng.random() < 0.5:
        sentence = f"{_name(a)} plus {_name(b)} is {_name(a + b)}"
    else:
        a, b = max(a, b), min(a, b)
        sentence = f"{_name(a)} minus {_name(b)} is {_name(a - b)}"
    return DemoDocument("arithmetic", (("text", (sentence,)),))


def count_numbers(prompt_kind: str, start: int, end: int) -> list[int]:
    """The numbers a counting prompt asks for: 'up' start..end, 'down' start..end downwards, 'even' by twos."""
    if prompt_kind == "up":
        return list(range(start, end + 1))
    if prompt_kind == "down":
        return list(range(start, end - 1, -1))
    if prompt_kind == "even":
        return list(range(start, end + 1, 2))
    raise ValueError(f"counting prompt kind {prompt_kind!r}: expected 'up', 'down' or 'even'")


def _interleaved(rng: np.random.Generator) -> DemoDocument:
    kind = ("up", "down", "even")[int(rng.integers(3))]
    count = int(rng.integers(2, MAX_INTERLEAVED_IMAGES + 1))
    if kind == "up":
        start = int(rng.integers(0, 11 - count))
        end = start + count - 1
    elif kind == "down":
        start = int(rng.integers(count - 1, 10))
        end = start - count + 1
    else:
        start = 2 * int(rng.integers(0, 6 - count))
        end = start + 2 * (count - 1)
    template = {"up": COUNT_UP, "down": COUNT_DOWN, "even": COUNT_EVEN}[kind]
    items = []
    for n in count_numbers(kind, start, end):
        items += drawing(n)
    prompt = template.format(start=_name(start), end=_name(end))
    return DemoDocument("interleaved", (("user", (prompt,)), ("assistant", tuple(items))))


def _next_digit(rng: np.random.Generator) -> DemoDocument:
    return next_digit_document(int(rng.integers(10)))


GENERATORS = {"caption": _caption, "draw": _draw, "question": _question, "counting": _counting,
              "arithmetic": _arithmetic, "interleaved": _interleaved, "next_digit": _next_digit}


def kind_weights(weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """``KIND_WEIGHTS`` with the kinds ``weights`` names replaced; ValueError for an unknown kind, a
    negative or non-numeric weight, or weights that are all zero."""
    out = dict(KIND_WEIGHTS)
    for kind, weight in dict(weights or {}).items():
        if kind not in KINDS:
            raise ValueError(f"corpus weight of kind {kind!r}: expected kinds of {KINDS}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float, np.integer, np.floating)) or weight < 0:
            raise ValueError(f"corpus weight {kind}={weight!r}: expected a number >= 0")
        out[kind] = float(weight)
    if not sum(out.values()) > 0:
        raise ValueError(f"corpus weights {out}: at least one must be positive")
    return out


def demo_corpus(seed: int = 0, num_documents: int = 4000, weights: Mapping[str, float] | None = None
                ) -> list[DemoDocument]:
    """``num_documents`` documents drawn from the templates with ``numpy.random.default_rng(seed)``.

    Kinds are drawn with ``KIND_WEIGHTS`` (``weights`` replaces the weights of the kinds it names),
    except that the first ``len(KINDS)`` documents are one of each kind (so every corpus holds every
    kind). Raises ValueError for a negative seed, fewer than ``len(KINDS)`` documents, or weights of
    unknown kinds, negative or all zero.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"demo corpus seed={seed!r}: expected an int >= 0")
    if isinstance(num_documents, bool) or not isinstance(num_documents, (int, np.integer)) or \
            num_documents < len(KINDS):
        raise ValueError(f"demo corpus num_documents={num_documents!r}: expected an int >= {len(KINDS)} (one "
                         f"document of each kind)")
    rng = np.random.default_rng(int(seed))
    weights = np.asarray([kind_weights(weights)[k] for k in KINDS])
    kinds = list(KINDS) + [KINDS[i] for i in rng.choice(len(KINDS), size=int(num_documents) - len(KINDS),
                                                        p=weights / weights.sum())]
    return [GENERATORS[kind](rng) for kind in kinds]


def corpus_summary(documents: Sequence[DemoDocument], *, encode=None, num_slots: int = 1) -> dict:
    """What the demo prints about a corpus: documents (in all and per kind), images, words (runs of
    letters in the text, markers excluded), distinct words and characters; with ``encode`` (a
    tokenizer's str → ids) also ``tokens``: the rendered documents' tokens with ``num_slots``
    slots per image, and ``text_tokens`` (slots and markers excluded: ``tokens`` − images ×
    (num_slots + 2))."""
    kinds = collections.Counter(d.kind for d in documents)
    words = [w for piece in text_pieces(documents) for w in re.findall(r"[A-Za-z]+", piece)]
    chars = {c for piece in text_pieces(documents) for c in piece}
    images = sum(len(d.digits) for d in documents)
    out = dict(documents=len(documents), kinds={k: kinds.get(k, 0) for k in KINDS}, images=images,
               words=len(words), distinct_words=len({w.lower() for w in words}), characters=len(chars))
    if encode is not None:
        tokens = sum(len(encode(render(d, num_slots))) for d in documents)
        out.update(tokens=tokens, text_tokens=tokens - images * (int(num_slots) + 2))
    return out

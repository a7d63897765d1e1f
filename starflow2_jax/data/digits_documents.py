"""The digits demo's STARFlow2 documents: the ``demo_text`` templates with real digits (``data.builder='digits_documents'``).

Stages 1–3 of the digits demo train on documents written in the words the stage-0 language model read
(``data.demo_text``: its templates and prompt constants, imported, never copied), each
``DigitImage(d)`` placeholder filled with a **real** digit of class ``d`` from the embedded digits'
**train split** (``data.digits``: the fixed 1500 / 297 split; the 297 held-out digits are never used).
Kinds (``KINDS``) and the role each plays (SPEC §5.1):

    caption      plain     caption → image (target) or image (context) → caption (trained text)
    draw         chat      user "draw the digit seven" → assistant image (target)
    question     chat      user image (context) + "What digit is this?" → assistant answer word (trained)
    interleaved  chat      user "Count from one to four, drawing each number." → assistant "one" image
                           "two" image … (words trained, images targets of the right classes)
    next_digit   chat      user image of d (context) + "Draw the next digit." → assistant image of
                           (d + 1) mod 10 (target)

Chat documents are Qwen2.5-VL's chat template exactly as ``demo_text.render`` writes it for the language
model (system turn first; the same text segments, so the same token ids): user and system turns are
context, the assistant's text (its closing ``<|im_end|>`` included) is trained and its images are
targets — ``pretzel.chat_items``' rule. Which kinds a stage reads follows ``model.starflow2.pairs``
(``KINDS_OF_PAIRS``): 't2i' (stage 1, L_NF) the kinds with target images and captions before their
image; 'i2t' (stage 2, L_NTP) the kinds that read an image and answer in words and draw nothing,
captions after their image (next_digit, which draws, would bring L_NF into stage 2: its drawn image's
likelihood reads the adapter's output through the deep stream); 'mixed' (stage 3) every kind, a caption before or after its image at random. Kinds are drawn
with ``demo_text.KIND_WEIGHTS`` (restricted to the stage's kinds), every filler with the
``demo_text`` generators where one fits (draw, interleaved, next_digit: the language model's own).

``DigitsDocuments`` is a grain random-map transform ``(example, rng) -> document``: ``example`` only
carries an ``index`` (``index_source(n)``: n documents per epoch), ``rng`` (grain's, seeded per seed,
epoch and position) draws the kind, the wording and the images, so the stream is deterministic per
seed and epoch and new in every epoch. The document is ``data.documents.DocumentPreprocess``'s output
(images scaled, resized to ``image_size``, noised; text items carry ``loss``) plus
``document_kind``, ``digits`` and ``image_source`` (the images' indices into ``load_digits()``).
``document_space(kind, pairs)`` lists every document a kind can draw (for the longest-document check).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from starflow2_jax.data import demo_text as dt
from starflow2_jax.data.digits import NUM_CLASSES, digit_captions
from starflow2_jax.data.images import decode_image
from starflow2_jax.data.interleaved import IMAGE, TEXT

KINDS = ("caption", "draw", "question", "interleaved", "next_digit")
KINDS_OF_PAIRS = {"t2i": ("caption", "draw", "interleaved", "next_digit"), "i2t": ("caption", "question"),
                  "mixed": KINDS}
DOCUMENTS_PER_EPOCH = 1500  # one epoch: as many documents as the train split has digits


def stage_kinds(pairs: str, kinds: Sequence[str] = (), field: str = "data.kinds") -> tuple[str, ...]:
    """The kinds a stage reads: ``kinds`` (checked: known, no repeats, allowed by ``pairs``) or, empty,
    every kind ``pairs`` allows (``KINDS_OF_PAIRS``). ValueError naming ``field`` otherwise."""
    if pairs not in KINDS_OF_PAIRS:
        raise ValueError(f"pairs={pairs!r}: expected one of {tuple(KINDS_OF_PAIRS)}")
    if isinstance(kinds, str):
        raise ValueError(f"{field}={kinds!r}: expected a list of kinds, e.g. ['draw', 'interleaved']")
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"{field}={list(kinds)}: unknown kind {unknown[0]!r}; expected kinds of {KINDS} (the "
                         f"language model's text-only kinds are not STARFlow2 documents)")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"{field}={list(kinds)}: a kind is listed twice")
    outside = [k for k in kinds if k not in KINDS_OF_PAIRS[pairs]]
    if outside:
        raise ValueError(f"{field}={list(kinds)}: {outside[0]!r} is not read with model.starflow2.pairs={pairs!r}, "
                         f"which reads {KINDS_OF_PAIRS[pairs]}")
    return kinds or KINDS_OF_PAIRS[pairs]


# ---- drawing documents (DemoDocuments with DigitImage placeholders) ------------------------------------
def _captions(d: int) -> list[str]:
    """Every caption of digit ``d``: the language model's caption kind (``demo_text``) reads the same."""
    return digit_captions(d) + [t.format(name=dt.NUMBER_WORDS[d], digit=d) for t in dt.EXTRA_CAPTIONS]


def _caption_document(d: int, caption: str, image_first: bool) -> dt.DemoDocument:
    items = (dt.DigitImage(d), caption) if image_first else (caption, dt.DigitImage(d))
    return dt.DemoDocument("caption", (("text", items),))


def _question_document(d: int) -> dt.DemoDocument:
    return dt.DemoDocument("question", (("user", (dt.DigitImage(d), dt.QUESTION)),
                                        ("assistant", (dt.ANSWER.format(name=dt.NUMBER_WORDS[d]),))))


def draw_document(kind: str, pairs: str, rng: np.random.Generator) -> dt.DemoDocument:
    """One document of ``kind`` drawn with ``rng`` (captions ordered as ``pairs`` says)."""
    if kind == "caption":
        d = int(rng.integers(NUM_CLASSES))
        captions = _captions(d)
        caption = captions[int(rng.integers(len(captions)))]
        image_first = pairs == "i2t" or (pairs == "mixed" and bool(rng.integers(2)))
        return _caption_document(d, caption, image_first)
    if kind == "question":  # the language model's question kind also asks without an image; here always with one
        return _question_document(int(rng.integers(NUM_CLASSES)))
    if kind in ("draw", "interleaved", "next_digit"):
        return dt.GENERATORS[kind](rng)
    raise ValueError(f"document kind {kind!r}: expected one of {KINDS}")


def document_space(kind: str, pairs: str) -> list[dt.DemoDocument]:
    """Every document ``draw_document(kind, pairs, ·)`` can give (in a fixed order)."""
    orders = {"t2i": (False,), "i2t": (True,), "mixed": (False, True)}[pairs]
    if kind == "caption":
        return [_caption_document(d, c, first) for d in range(NUM_CLASSES) for c in _captions(d) for first in orders]
    if kind == "question":
        return [_question_document(d) for d in range(NUM_CLASSES)]
    if kind == "draw":
        return [dt.draw_document(t.format(name=dt.NUMBER_WORDS[d], digit=d), d)
                for t in dt.DRAW_PROMPTS for d in range(NUM_CLASSES)]
    if kind == "next_digit":
        return [dt.next_digit_document(d) for d in range(NUM_CLASSES)]
    if kind == "interleaved":
        out = []
        templates = {"up": dt.COUNT_UP, "down": dt.COUNT_DOWN, "even": dt.COUNT_EVEN}
        for way, template in templates.items():
            for start in range(NUM_CLASSES):
                for end in range(NUM_CLASSES):
                    numbers = dt.count_numbers(way, start, end)
                    if not 2 <= len(numbers) <= dt.MAX_INTERLEAVED_IMAGES or numbers[-1] != end or \
                            (way == "even" and start % 2):  # the generator counts by twos from even numbers
                        continue
                    items = tuple(x for n in numbers for x in dt.drawing(n))
                    prompt = template.format(start=dt.NUMBER_WORDS[start], end=dt.NUMBER_WORDS[end])
                    out.append(dt.DemoDocument("interleaved", (("user", (prompt,)), ("assistant", items))))
        return out
    raise ValueError(f"document kind {kind!r}: expected one of {KINDS}")


# ---- DemoDocument → items (the chat template of demo_text.render / pretzel.chat_items) -----------------
def document_items(document: dt.DemoDocument, images: Sequence[Any] = (),
                   system: str | None = dt.DEFAULT_SYSTEM) -> list[dict[str, Any]]:
    """The items of ``document`` in reading order: ``{'text': str, 'loss': bool}`` and
    ``{'image': images[k], 'target': bool}`` (the k-th placeholder; ``images`` empty: the placeholder's
    ``DigitImage``). Chat documents in Qwen2.5-VL's chat template, segmented as ``pretzel.chat_items``
    writes it (so the token ids equal ``encode(demo_text.render(document, N))``'s); plain documents
    (captions): text trained, an image a target when a caption precedes it."""
    placeholders = iter(images) if images else None

    def image(item, target):
        return {"image": next(placeholders) if placeholders is not None else item, "target": bool(target)}

    if not document.chat:
        out, seen_text = [], False
        for _, items in document.turns:
            for item in items:
                if isinstance(item, dt.DigitImage):
                    out.append(image(item, seen_text))
                else:
                    out.append({"text": item, "loss": True})
                    seen_text = True
        return out
    out = [] if system is None else [{"text": f"{dt.IM_START}system\n{system}{dt.IM_END}\n", "loss": False}]
    for role, items in document.turns:
        trained = role == "assistant"
        out.append({"text": f"{dt.IM_START}{role}\n", "loss": False})
        for item in items:
            out.append(image(item, trained) if isinstance(item, dt.DigitImage) else {"text": item, "loss": trained})
        out += [{"text": dt.IM_END, "loss": trained}, {"text": "\n", "loss": False}]
    return out


# ---- the pool of real digits and the transform ----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DigitsPool:
    """The digits documents draw their images from: ``images`` uint8 (n, 8, 8, 1), ``labels`` (n,),
    ``indices`` (n,) into ``load_digits()``; ``by_class[d]`` the positions of class d."""

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    by_class: tuple

    @classmethod
    def from_source(cls, source: Sequence[Mapping[str, Any]]) -> "DigitsPool":
        """The pool of a digits data source (``build_digits(...).as_data_source('train')``); ValueError when
        a class has no image."""
        examples = [source[i] for i in range(len(source))]
        images = np.stack([decode_image(e["image"]) for e in examples]).astype(np.uint8)
        labels = np.asarray([int(e["label"]) for e in examples], np.int64)
        indices = np.asarray([int(e["index"]) for e in examples], np.int64)
        by_class = tuple(np.flatnonzero(labels == d) for d in range(NUM_CLASSES))
        empty = [d for d in range(NUM_CLASSES) if not len(by_class[d])]
        if empty:
            raise ValueError(f"digits pool of {len(examples)} images has no digit {empty[0]}; expected every class")
        return cls(images, labels, indices, by_class)

    def pick(self, digit: int, rng: np.random.Generator) -> int:
        """A uniformly drawn position of a digit ``digit``."""
        members = self.by_class[int(digit)]
        return int(members[int(rng.integers(len(members)))])


def index_source(count: int = DOCUMENTS_PER_EPOCH) -> list[dict[str, np.int64]]:
    """The random-access source of an epoch of ``count`` documents: ``[{'index': i}, ...]``."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"digits documents per epoch {count!r}: expected a positive int")
    return [{"index": np.int64(i)} for i in range(int(count))]


@dataclasses.dataclass(frozen=True)
class DigitsDocuments:
    """``(example, rng) -> document`` (module docstring): a kind of ``kinds`` (weights
    ``demo_text.KIND_WEIGHTS``), its ``DemoDocument``, real digits from ``pool`` and ``documents``
    (a ``DocumentPreprocess``) on the result. Random draws in a fixed order: kind, wording, images, noise."""

    pool: DigitsPool
    kinds: tuple
    pairs: str
    documents: Any  # data.documents.DocumentPreprocess

    def __post_init__(self):
        stage_kinds(self.pairs, self.kinds, field="DigitsDocuments.kinds")
        if not self.kinds:
            raise ValueError("DigitsDocuments.kinds is empty; expected at least one kind (see stage_kinds)")

    def stored(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        """The document as a stored interleaved example (``data.interleaved``'s fields, texts with
        ``text_loss``) plus ``document_kind``, ``digits`` and ``image_source``."""
        weights = np.asarray([dt.KIND_WEIGHTS[k] for k in self.kinds], np.float64)
        kind = self.kinds[int(rng.choice(len(self.kinds), p=weights / weights.sum()))]
        document = draw_document(kind, self.pairs, rng)
        positions = [self.pool.pick(d, rng) for d in document.digits]
        items = document_items(document, [self.pool.images[p] for p in positions])
        texts = [i for i in items if "text" in i]
        return {"kinds": np.asarray([TEXT if "text" in i else IMAGE for i in items], np.int8),
                "texts": [i["text"] for i in texts], "text_loss": np.asarray([i["loss"] for i in texts], bool),
                "images": [i["image"] for i in items if "image" in i],
                "image_target": np.asarray([i["target"] for i in items if "image" in i], bool),
                "index": np.int64(index), "document_kind": kind,
                "digits": np.asarray(document.digits, np.int64),
                "image_source": self.pool.indices[np.asarray(positions, np.int64)]}

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        stored = self.stored(int(example["index"]), rng)
        out = dict(self.documents(stored, rng))
        out.update({k: stored[k] for k in ("document_kind", "digits", "image_source")})
        return out

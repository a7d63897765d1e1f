"""One document (text segments and images) → the per-token and per-image arrays Pretzel reads.

An image becomes ``<|vision_start|>``, N slots, ``<|vision_end|>``; positions are Qwen2.5-VL's
3D ids (``vlm.positions``), restarting at 0 per document: text advances (t, h, w) together, the
slots of an image sit on an h×w grid after its ``<|vision_start|>`` and the text after the image
resumes at start + max(h, w). Slot tokens carry ``<|image_pad|>`` (what the VLM reads when the
adapter is off). The returned dict (numpy, the contract the data packer keeps):

    tokens (T,) int32, positions (T, 3) int32, slot (T,) bool, image_index (T,) int32 (−1 off slots),
    text_loss (T,) bool — position t is trained to predict token t + 1 —,
    images (n, H, W, C) float32, image_target (n,) bool.

The data packer concatenates documents into rows of L tokens and M images, adding ``segment_ids``
(1..k, 0 = padding) and ``image_valid`` (M,) and offsetting ``image_index`` by the images before;
``pretzel.model`` reads such rows.

Trained text: position t predicts token t + 1 when that token belongs to a trained text segment, or
is the ``<|vision_start|>`` of a target image (the model learns when to start an image); slots and
``<|vision_start|>`` never predict text, ``<|vision_end|>`` predicts the following trained text.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from starflow2_jax.pretzel.config import PretzelConfig
from starflow2_jax.vlm.positions import image_slot_positions

DEFAULT_SYSTEM = "You are a helpful assistant."


@dataclasses.dataclass(frozen=True)
class Text:
    """A text segment: a string (needs ``encode``) or token ids; ``loss``: its tokens are NTP targets."""

    content: str | Sequence[int]
    loss: bool = True


@dataclasses.dataclass(frozen=True)
class Image:
    """An image (H, W, C) in [−1, 1]; ``target``: its flow likelihood is trained (else context only)."""

    pixels: np.ndarray
    target: bool = True


def _item(item):
    if isinstance(item, (Text, Image)):
        return item
    if isinstance(item, np.ndarray) and item.ndim == 3 and np.issubdtype(item.dtype, np.floating):
        return Image(item)
    if isinstance(item, str) or (isinstance(item, (list, tuple, np.ndarray)) and
                                 all(isinstance(t, (int, np.integer)) for t in np.asarray(item).ravel().tolist())):
        return Text(item)
    raise ValueError(f"document item of type {type(item).__name__}: expected Text, Image, a string, token ids or "
                     f"a float image array (H, W, C)")


def _tokens(text: Text, encode) -> list[int]:
    if isinstance(text.content, str):
        if encode is None:
            raise ValueError(f"text segment {text.content[:40]!r} is a string: pass encode= (str → token ids)")
        return [int(t) for t in encode(text.content)]
    return [int(t) for t in np.asarray(text.content).ravel().tolist()]


def layout_document(config: PretzelConfig, items: Sequence, *, encode: Callable[[str], Sequence[int]] | None = None,
                    max_length: int | None = None) -> dict:
    """The arrays of one document (see the module docstring).

    items: ``Text`` / ``Image`` or bare strings, token-id lists (trained text) and float arrays
    (target images). encode: tokenizer for string segments. max_length: the longest allowed
    document (default ``config.seq_len``). Raises ValueError for an image when the config holds
    none (max_images 0), more images than a row holds, a wrong image shape, token ids outside the
    vocabulary, or a document longer than ``max_length``.
    """
    items = [_item(i) for i in items]
    vocab = config.vlm
    gh, gw = config.grid
    n_slots = config.num_slots
    max_length = config.seq_len if max_length is None else max_length
    images = [i for i in items if isinstance(i, Image)]
    if images and config.max_images == 0:
        raise ValueError(f"the document holds {len(images)} image(s) but the config expects none (max_images=0)")
    if len(images) > config.max_images:
        raise ValueError(f"the document holds {len(images)} images; a row holds at most max_images="
                         f"{config.max_images}")
    tokens, positions, slot, image_index, trained = [], [], [], [], []
    current = 0
    for item in items:
        if isinstance(item, Text):
            ids = _tokens(item, encode)
            bad = [t for t in ids if not 0 <= t < vocab.vocab_size]
            if bad:
                raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab.vocab_size})")
            tokens += ids
            positions += [(p, p, p) for p in range(current, current + len(ids))]
            slot += [False] * len(ids)
            image_index += [-1] * len(ids)
            trained += [item.loss] * len(ids)
            current += len(ids)
            continue
        k = len([i for i in image_index if i >= 0]) // n_slots
        shape = tuple(np.shape(item.pixels))
        if shape != tuple(config.latent.image_shape):
            raise ValueError(f"image {k} has shape {shape}: expected {tuple(config.latent.image_shape)} (H, W, C)")
        tokens.append(vocab.vision_start_token_id)
        positions.append((current, current, current))
        slot.append(False)
        image_index.append(-1)
        trained.append(bool(item.target))  # predicting <|vision_start|> is trained for a target image
        grid_pos, current = image_slot_positions(current + 1, gh, gw)
        tokens += [vocab.image_token_id] * n_slots
        positions += [tuple(p) for p in grid_pos.T.tolist()]
        slot += [True] * n_slots
        image_index += [k] * n_slots
        trained += [False] * n_slots
        tokens.append(vocab.vision_end_token_id)
        positions.append((current, current, current))
        slot.append(False)
        image_index.append(-1)
        trained.append(False)
        current += 1
    if len(tokens) > max_length:
        raise ValueError(f"the document is {len(tokens)} tokens long ({len(images)} images of {n_slots + 2}); the "
                         f"maximum length is {max_length}")
    trained_next = np.zeros(len(tokens), bool)
    trained_next[:-1] = np.asarray(trained[1:], bool)
    height, width, channels = config.latent.image_shape
    pixels = (np.stack([np.asarray(i.pixels, np.float32) for i in images]) if images
              else np.zeros((0, height, width, channels), np.float32))
    return dict(tokens=np.asarray(tokens, np.int32), positions=np.asarray(positions, np.int32).reshape(-1, 3),
                slot=np.asarray(slot, bool), image_index=np.asarray(image_index, np.int32),
                text_loss=trained_next, images=pixels,
                image_target=np.asarray([bool(i.target) for i in images], bool))


def chat_items(messages: Sequence[tuple[str, Sequence]], *, system: str | None = DEFAULT_SYSTEM,
               add_generation_prompt: bool = False) -> list:
    """Qwen2.5-VL's chat template as document items.

    messages: ``(role, items)`` pairs, role 'user' | 'assistant' | 'system', items as for
    ``layout_document``. Each turn is ``<|im_start|>role\\n`` … ``<|im_end|>\\n``; assistant text and
    images are trained (NTP targets / generation targets, including the closing ``<|im_end|>``),
    everything else is context. ``add_generation_prompt`` appends ``<|im_start|>assistant\\n``.
    Strings need the tokenizer's ``encode`` (which must map the special markers to their ids).
    """
    out = [] if system is None else [Text(f"<|im_start|>system\n{system}<|im_end|>\n", loss=False)]
    for role, items in messages:
        if role not in ("user", "assistant", "system"):
            raise ValueError(f"chat role {role!r}: expected 'user', 'assistant' or 'system'")
        trained = role == "assistant"
        out.append(Text(f"<|im_start|>{role}\n", loss=False))
        for item in items:
            item = _item(item)
            if isinstance(item, Text):
                out.append(dataclasses.replace(item, loss=trained and item.loss))
            else:
                out.append(dataclasses.replace(item, target=trained and item.target))
        out += [Text("<|im_end|>", loss=trained), Text("\n", loss=False)]
    if add_generation_prompt:
        out.append(Text("<|im_start|>assistant\n", loss=False))
    return out

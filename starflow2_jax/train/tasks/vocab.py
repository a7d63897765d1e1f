"""A deterministic word-level caption vocabulary (no files, no training): ids for the demo's captions.

Words are lowercased runs of letters/digits, other non-space characters are single-character
tokens. Ids: 0 = padding (also the whole encoding of the empty caption — the guidance
"unconditional" caption), 1 = unknown word, then the sorted distinct words of the source texts.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

PAD_ID = 0
UNK_ID = 1
_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def split_words(text: str) -> list[str]:
    """The tokens of ``text`` (lowercased words and single punctuation characters)."""
    return _TOKEN.findall(text.lower())


class WordVocab:
    """Word → id table built from ``texts`` (captions or single words); see the module docstring."""

    def __init__(self, texts: Iterable[str]):
        texts = list(texts)
        bad = [t for t in texts if not isinstance(t, str)]
        if bad:
            raise ValueError(f"WordVocab: texts must be strings, got {bad[0]!r}")
        words = sorted({w for t in texts for w in split_words(t)})
        self.words: tuple[str, ...] = ("<pad>", "<unk>", *words)
        self._ids = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str, length: int) -> np.ndarray:
        """int32 ids (length,) of ``text``: truncated to ``length``, padded with PAD_ID."""
        ids = [self._ids.get(w, UNK_ID) for w in split_words(text)][:length]
        return np.asarray(ids + [PAD_ID] * (length - len(ids)), np.int32)

    def encode_batch(self, texts: Sequence[str] | np.ndarray, length: int) -> np.ndarray:
        """int32 ids (B, length) for a sequence / numpy array of str or bytes."""
        rows = [self.encode(t.decode("utf-8") if isinstance(t, bytes) else str(t), length) for t in texts]
        return np.stack(rows) if rows else np.zeros((0, length), np.int32)

"""The embedded demo dataset: scikit-learn's 1797 real 8×8 handwritten digits as a TFDS builder.

``build_digits(data_dir)`` writes ``data_dir/starflow2_digits/1.0.0`` as ArrayRecord files (no
download: the digits ship inside the scikit-learn wheel). Every example holds

- ``image``: PNG, uint8 ``(8, 8, 1)`` with the original 17 grey levels ``0..16`` stored as-is
  (not rescaled to 0..255), so decoding gives back scikit-learn's integers exactly;
- ``label``: ClassLabel(10), the digit;
- ``captions``: ``len(CAPTION_TEMPLATES)`` strings ("a handwritten digit seven", ...);
- ``index``: int64, the example's index in ``sklearn.datasets.load_digits()``.

Split (fixed, stratified by digit): ``train_test_split(arange(1797), test_size=297, stratify=target,
random_state=0)`` from scikit-learn, each side sorted → 1500 train / 297 test. Records are stored in
that sorted order (TFDS shuffling disabled), so record ``i`` of a split is ``split_indices[i]``.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from starflow2_jax.data.images import encode_png

DIGITS_LEVELS = 16  # max pixel value: load_digits counts set pixels of a 4×4 block → 0..16
NUM_CLASSES = 10
DIGITS_SHAPE = (8, 8, 1)
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUM_TEST = 297
CAPTION_TEMPLATES = (
    "a handwritten digit {name}",
    "the number {digit} written by hand",
    "a scanned digit {name}",
    "a small grey image {article} {name}",
    "a handwritten {digit}",
    "the digit {name}, written by hand",
)


def digit_captions(label: int) -> list[str]:
    """The ``len(CAPTION_TEMPLATES)`` captions of digit ``label`` (0..9), in template order."""
    if not 0 <= int(label) < NUM_CLASSES:
        raise ValueError(f"digit label {label}; expected 0..{NUM_CLASSES - 1}")
    name = DIGIT_NAMES[label]
    article = "of an" if name == "eight" else "of a"
    return [template.format(name=name, digit=int(label), article=article) for template in CAPTION_TEMPLATES]


def digits_split_indices() -> dict[str, np.ndarray]:
    """``{'train': (1500,), 'test': (297,)}`` sorted int64 indices into ``load_digits()`` (see module doc)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    train, test = train_test_split(np.arange(len(target)), test_size=NUM_TEST, stratify=target, random_state=0)
    return {"train": np.sort(train).astype(np.int64), "test": np.sort(test).astype(np.int64)}


class Starflow2Digits(tfds.core.GeneratorBasedBuilder):
    """TFDS builder ``starflow2_digits``: scikit-learn's digits with captions, a fixed stratified split."""

    name = "starflow2_digits"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "1500 train / 297 test, 17 grey levels stored as-is, 6 caption templates."}

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly, not dataset_info_from_configs: the latter reads metadata files from this package.
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=DIGITS_SHAPE, encoding_format="png"),
                "label": tfds.features.ClassLabel(names=list(DIGIT_NAMES)),
                "captions": tfds.features.Sequence(tfds.features.Text()),
                "index": np.int64,
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
            homepage="https://archive.ics.uci.edu/dataset/80",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data ship with scikit-learn
        return {split: self._generate_examples(indices) for split, indices in digits_split_indices().items()}

    def _generate_examples(self, indices):
        from sklearn.datasets import load_digits

        digits = load_digits()
        for index in indices:
            pixels = digits.images[index].astype(np.uint8)  # (8, 8), float 0..16 → exact uint8
            label = int(digits.target[index])
            yield int(index), {
                "image": encode_png(pixels[..., None]),
                "label": label,
                "captions": digit_captions(label),
                "index": int(index),
            }


def build_digits(data_dir: str | os.PathLike) -> Starflow2Digits:
    """Prepares (once; later calls reuse the files) and returns the ``starflow2_digits`` builder in ``data_dir``.

    Read a split with ``builder.as_data_source('train' | 'test')``: a random-access source whose
    examples are ``{'image': uint8 (8, 8, 1), 'label': int, 'captions': list[bytes], 'index': int}``.
    """
    builder = Starflow2Digits(data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder

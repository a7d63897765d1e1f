"""A hand-built packer for the tests: documents into one row, exactly the layout contract."""

from typing import Sequence

import numpy as np

from starflow2_jax.pretzel.config import PretzelConfig

def pack_documents(config: PretzelConfig, documents: Sequence[dict], length: int | None = None,
                   max_images: int | None = None) -> dict:
    """Documents (``layout_document`` dicts) in one row of ``length`` tokens and ``max_images`` images.

    Adds ``segment_ids`` (L,) int32 (1..k, 0 = padding) and ``image_valid`` (M,) bool, pads per-token
    fields with 0 / False / −1 (image_index) and per-image fields with zeros, and offsets each
    document's ``image_index`` by the images before it. Raises ValueError when they do not fit.
    """
    length = config.seq_len if length is None else length
    max_images = config.max_images if max_images is None else max_images
    total = sum(len(d["tokens"]) for d in documents)
    n_images = sum(len(d["images"]) for d in documents)
    if total > length:
        raise ValueError(f"{len(documents)} documents of {total} tokens do not fit a row of {length}")
    if n_images > max_images:
        raise ValueError(f"{len(documents)} documents hold {n_images} images; a row holds {max_images}")
    pad = length - total
    row = {}
    for name, fill in (("tokens", 0), ("slot", False), ("text_loss", False)):
        row[name] = np.concatenate([d[name] for d in documents] + [np.full(pad, fill, documents[0][name].dtype)])
    row["positions"] = np.concatenate([d["positions"] for d in documents] + [np.zeros((pad, 3), np.int32)])
    offsets = np.cumsum([0] + [len(d["images"]) for d in documents])
    row["image_index"] = np.concatenate(
        [np.where(d["image_index"] >= 0, d["image_index"] + offsets[i], -1) for i, d in enumerate(documents)]
        + [np.full(pad, -1, np.int32)]).astype(np.int32)
    row["segment_ids"] = np.concatenate([np.full(len(d["tokens"]), i + 1, np.int32) for i, d in enumerate(documents)]
                                        + [np.zeros(pad, np.int32)])
    shape = tuple(config.latent.image_shape)
    images = [d["images"] for d in documents] + [np.zeros((max_images - n_images,) + shape, np.float32)]
    row["images"] = np.concatenate(images).astype(np.float32)
    row["image_target"] = np.concatenate([d["image_target"] for d in documents]
                                         + [np.zeros(max_images - n_images, bool)])
    row["image_valid"] = np.arange(max_images) < n_images
    return row


def stack_rows(rows: Sequence[dict]) -> dict:
    """Rows (``pack_documents`` dicts) stacked into a batch: every field gains a leading batch axis."""
    return {name: np.stack([r[name] for r in rows]) for name in rows[0]}

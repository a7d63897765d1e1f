"""Data: TFDS builders (ArrayRecord) for the embedded digits, photo tiles, users' image–text pairs and interleaved
documents; grain pipelines; packing documents into fixed-length rows; checks that name a damaged dataset file;
the digits demo's text (demo_text), tokenizer (demo_tokenizer) and STARFlow2 documents (digits_documents).

A leaf package: it imports neither models nor training code. Typical use::

    builder = build_digits(data_dir)
    preprocess = ImagePreprocess(levels=DIGITS_LEVELS, noise="uniform", label_dropout=0.1)
    batches = iter(make_pipeline(builder.as_data_source("train"), batch_size=64, seed=0, shuffle=True,
                                 preprocess=preprocess))

Interleaved data (documents of text and images, packed)::

    builder = build_interleaved("docs.jsonl", data_dir, image_size=256)
    documents = DocumentPreprocess(levels=255)           # also accepts image–text pairs: caption, then image
    spec = PackingSpec(length=4096, max_images=8, token_fields={...}, image_fields={...})
    rows = make_packed_pipeline(builder.as_data_source("train"), spec=spec, batch_size=64, seed=0,
                                shuffle=True, preprocess=lambda ex, rng: layout(documents(ex, rng)))
"""

from starflow2_jax.data.check import DatasetError, NamedSource, check_dataset_dir
from starflow2_jax.data.digits import (CAPTION_TEMPLATES, DIGIT_NAMES, DIGITS_LEVELS, DIGITS_SHAPE, NUM_CLASSES,
                                       Starflow2Digits, build_digits, digit_captions, digits_split_indices)
from starflow2_jax.data.documents import DocumentPreprocess, pair_items
from starflow2_jax.data.image_text import ImageTextConfig, Starflow2ImageText, build_image_text
from starflow2_jax.data.images import decode_image, encode_png, resize_and_center_crop, scale_pixels, unscale_pixels
from starflow2_jax.data.interleaved import IMAGE, TEXT, Starflow2Interleaved, build_interleaved, document_items
from starflow2_jax.data.packing import PackIterDataset, PackingSpec, pack, pack_documents, unpack_row
from starflow2_jax.data.photos import PHOTOS, PHOTOS_LEVELS, PHOTOS_SHAPE, Starflow2Photos, build_photos
from starflow2_jax.data.pipeline import make_packed_pipeline, make_pipeline
from starflow2_jax.data.preprocess import CHANNEL_OPTIONS, NOISE_KINDS, ImagePreprocess

__all__ = [
    "CAPTION_TEMPLATES", "CHANNEL_OPTIONS", "DIGITS_LEVELS", "DIGITS_SHAPE", "DIGIT_NAMES", "DatasetError",
    "DocumentPreprocess", "IMAGE", "ImagePreprocess", "ImageTextConfig", "NOISE_KINDS", "NUM_CLASSES",
    "NamedSource", "PHOTOS", "PHOTOS_LEVELS", "PHOTOS_SHAPE", "PackIterDataset", "PackingSpec", "Starflow2Digits",
    "Starflow2ImageText", "Starflow2Interleaved", "Starflow2Photos", "TEXT", "build_digits", "build_image_text",
    "build_interleaved", "build_photos", "check_dataset_dir", "decode_image", "digit_captions",
    "digits_split_indices", "document_items", "encode_png", "make_packed_pipeline", "make_pipeline", "pack",
    "pack_documents", "pair_items", "resize_and_center_crop", "scale_pixels", "unpack_row", "unscale_pixels",
]

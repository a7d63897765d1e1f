"""Data: TFDS builders (ArrayRecord) for the embedded digits, photo tiles and users' image–text data, grain pipelines.

A leaf package: it imports neither models nor training code. Typical use::

    builder = build_digits(data_dir)
    preprocess = ImagePreprocess(levels=DIGITS_LEVELS, noise="uniform", label_dropout=0.1)
    batches = iter(make_pipeline(builder.as_data_source("train"), batch_size=64, seed=0, shuffle=True,
                                 preprocess=preprocess))
"""

from starflow2_jax.data.digits import (CAPTION_TEMPLATES, DIGIT_NAMES, DIGITS_LEVELS, DIGITS_SHAPE, NUM_CLASSES,
                                       Starflow2Digits, build_digits, digit_captions, digits_split_indices)
from starflow2_jax.data.image_text import ImageTextConfig, Starflow2ImageText, build_image_text
from starflow2_jax.data.images import decode_image, encode_png, resize_and_center_crop, scale_pixels, unscale_pixels
from starflow2_jax.data.photos import PHOTOS, PHOTOS_LEVELS, PHOTOS_SHAPE, Starflow2Photos, build_photos
from starflow2_jax.data.pipeline import make_pipeline
from starflow2_jax.data.preprocess import CHANNEL_OPTIONS, NOISE_KINDS, ImagePreprocess

__all__ = [
    "CAPTION_TEMPLATES", "CHANNEL_OPTIONS", "DIGITS_LEVELS", "DIGITS_SHAPE", "DIGIT_NAMES", "ImagePreprocess",
    "ImageTextConfig", "NOISE_KINDS", "NUM_CLASSES", "PHOTOS", "PHOTOS_LEVELS", "PHOTOS_SHAPE", "Starflow2Digits",
    "Starflow2ImageText", "Starflow2Photos", "build_digits", "build_image_text", "build_photos", "decode_image",
    "digit_captions", "digits_split_indices", "encode_png", "make_pipeline", "resize_and_center_crop",
    "scale_pixels", "unscale_pixels",
]

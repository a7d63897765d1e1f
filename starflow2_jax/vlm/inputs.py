"""Model inputs from text and images: the checkpoint's tokenizer, transformers' PIL image processor,
and the image-pad expansion and ``mm_token_type_ids`` done here.

    tokenizer = inputs.load_tokenizer(model_dir)
    processor = inputs.load_image_processor(model_dir)
    prompt = inputs.chat_prompt(tokenizer, "What is in the picture?", num_images=1)
    batch = inputs.encode(config, tokenizer, [prompt], images=[[image]], image_processor=processor)
    logits = vlm.forward(config, params, **batch)

A prompt marks each image with ``<|vision_start|><|image_pad|><|vision_end|>`` (``IMAGE_PLACEHOLDER``);
after tokenisation the single ``<|image_pad|>`` of image i becomes t·h·w / merge² copies (its merged
grid). ``Qwen2_5_VLProcessor`` would do the same but cannot be built without torchvision.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from starflow2_jax.vlm.config import QwenVLConfig
from starflow2_jax.vlm.positions import IMAGE, TEXT, merged_tokens

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
PREPROCESSOR_FILE = "preprocessor_config.json"
# transformers' Qwen2-VL defaults: 4·28² … 16384·28² pixels (28 = patch 14 × merge 2)
DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS = 56 * 56, 28 * 28 * 1280
# the image processor's normalisation (OpenAI CLIP's mean and std per RGB channel, pixels rescaled by 1/255)
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def load_tokenizer(model_dir):
    """``transformers.AutoTokenizer.from_pretrained(model_dir)`` (local files only, no download)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def load_image_processor(model_dir=None, *, min_pixels: int | None = None, max_pixels: int | None = None,
                         config: QwenVLConfig | None = None):
    """A ``transformers.Qwen2VLImageProcessorPil``: from ``model_dir/preprocessor_config.json`` when it
    exists, else transformers' defaults with explicit pixel bounds (``min_pixels`` / ``max_pixels``,
    default 56² and 28²·1280) and the patch / merge sizes of ``config.vision`` when given."""
    from transformers import Qwen2VLImageProcessorPil

    overrides = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    if model_dir is not None and (Path(model_dir) / PREPROCESSOR_FILE).is_file():
        return Qwen2VLImageProcessorPil.from_pretrained(str(model_dir), local_files_only=True, **overrides)
    settings = {"min_pixels": DEFAULT_MIN_PIXELS, "max_pixels": DEFAULT_MAX_PIXELS, **overrides}
    if config is not None:
        v = config.vision
        settings.update(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                        merge_size=v.spatial_merge_size)
    return Qwen2VLImageProcessorPil(**settings)


def process_images(image_processor, images) -> tuple[np.ndarray, np.ndarray]:
    """``(pixel_values (Σ t·h·w, C·tp·p·p) float32, image_grid_thw (num_images, 3) int64)`` of a list of
    PIL images or HWC uint8 arrays, in order."""
    out = image_processor(images=list(images), return_tensors="np")
    return np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"], np.int64)


def pixel_patches(images, vision) -> "jax.Array":
    """The image processor's ``pixel_values`` of K same-size images, computed with jax (jit-able, so a
    training step can patchify on the device): images (K, H, W, C) uint8 RGB (or values 0..255) whose H
    and W are multiples of ``patch_size · spatial_merge_size`` (no resizing) → (K·h·w, C·tp·p·p) float32,
    image k's rows first, each image's patches in spatial-merge order, every frame repeated
    ``temporal_patch_size`` times — equal to ``Qwen2VLImageProcessorPil``'s output for such images
    (grid (1, H/p, W/p) each; ``pixel_grids`` gives the grids). Raises ValueError for other sizes."""
    import jax.numpy as jnp

    k, height, width, channels = images.shape
    p, m, tp = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    if height % (p * m) or width % (p * m) or channels != len(IMAGE_MEAN) or channels != vision.in_channels:
        raise ValueError(f"images of shape {tuple(images.shape)}: expected (K, H, W, {vision.in_channels}) RGB with H "
                         f"and W multiples of patch_size·spatial_merge_size = {p * m}")
    mean, std = jnp.asarray(IMAGE_MEAN, jnp.float32), jnp.asarray(IMAGE_STD, jnp.float32)
    x = (jnp.asarray(images, jnp.float32) / 255.0 - mean) / std  # (K, H, W, C)
    x = jnp.broadcast_to(jnp.moveaxis(x, -1, 1)[:, None], (k, tp, channels, height, width))
    gh, gw = height // p, width // p
    x = x.reshape(k, tp, channels, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (K, gh/m, gw/m, m, m, C, tp, p, p)
    return x.reshape(k * gh * gw, channels * tp * p * p)


def pixel_grids(vision, count: int, height: int, width: int) -> np.ndarray:
    """(count, 3) int64 ``image_grid_thw`` of ``count`` images of height×width pixels (one frame each)."""
    return np.tile(np.asarray([[1, height // vision.patch_size, width // vision.patch_size]], np.int64), (count, 1))


def chat_prompt(tokenizer, text: str, num_images: int = 0, *, system: str | None = None,
                add_generation_prompt: bool = True) -> str:
    """One user turn with ``num_images`` images before ``text``, through the tokenizer's chat template
    (Qwen's emits ``IMAGE_PLACEHOLDER`` per image); without a template, placeholders + text."""
    if not getattr(tokenizer, "chat_template", None):
        return IMAGE_PLACEHOLDER * num_images + text
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def expand_image_tokens(config: QwenVLConfig, ids, image_grid_thw) -> list[int]:
    """``ids`` with the k-th ``<|image_pad|>`` repeated t·h·w / merge² times for the k-th grid row.
    Raises ValueError when the number of ``<|image_pad|>`` tokens differs from the number of grids."""
    pad = config.text.image_token_id
    counts = merged_tokens(np.zeros((0, 3)) if image_grid_thw is None else image_grid_thw,
                           config.vision.spatial_merge_size).tolist()
    ids = [int(i) for i in ids]
    found = ids.count(pad)
    if found != len(counts):
        raise ValueError(f"the prompt holds {found} image placeholder(s) (<|image_pad|>, id {pad}) but "
                         f"{len(counts)} image(s) were given; put one {IMAGE_PLACEHOLDER} per image in the text")
    out, images = [], iter(counts)
    for i in ids:
        out.extend([pad] * next(images) if i == pad else [i])
    return out


def encode(config: QwenVLConfig, tokenizer, texts, images=None, *, image_processor=None,
           pad_id: int | None = None) -> dict:
    """Tokenises ``texts`` (a string or a list) with their ``images`` into a left-padded batch.

    images: for one string a list of images; for a list of strings a list of lists (one per text,
    possibly empty). Each text must hold one ``IMAGE_PLACEHOLDER`` per image. Returns a dict of numpy
    arrays, the keyword arguments of ``vlm.forward``: ``input_ids`` (B, T) int32, ``attention_mask``
    (B, T) int32 (0 on the left padding), ``mm_token_type_ids`` (B, T) int32 (1 image, 0 text), and
    with images ``pixel_values`` (Σ patches, C·tp·p·p) float32 and ``image_grid_thw`` (N, 3) int64.
    """
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    if images is None:
        images = [[] for _ in texts]
    elif single:
        images = [list(images)]
    if len(images) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(images)} image lists; pass one list (maybe empty) per text")
    flat = [image for row in images for image in row]
    pixel_values = grids = None
    if flat:
        processor = image_processor or load_image_processor(config=config)
        pixel_values, grids = process_images(processor, flat)
    rows, start = [], 0
    for text, row_images in zip(texts, images):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        rows.append(expand_image_tokens(config, ids, None if grids is None else grids[start:start + len(row_images)]))
        start += len(row_images)
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.text.pad_token_id or 0
    length = max(len(r) for r in rows)
    input_ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for b, row in enumerate(rows):
        input_ids[b, length - len(row):] = row
        mask[b, length - len(row):] = 1
    types = np.where((input_ids == config.text.image_token_id) & (mask == 1), IMAGE, TEXT).astype(np.int32)
    batch = dict(input_ids=input_ids, attention_mask=mask, mm_token_type_ids=types)
    if flat:
        batch.update(pixel_values=pixel_values, image_grid_thw=grids)
    return batch

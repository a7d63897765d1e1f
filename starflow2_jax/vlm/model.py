"""The combined Qwen2.5-VL forward: vision features scattered into the text embeddings, 3-row positions.

Params tree: ``{'text': QwenTextModel params, 'vision': vision-tower params}`` (plain arrays).
Host side (numpy, outside jit): input validation, ``mm_token_type_ids`` and position ids. Device
side (jitted per config): vision tower, embedding scatter, decoder, LM head.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from starflow2_jax.vlm.config import QwenTextConfig, QwenVLConfig
from starflow2_jax.vlm.positions import IMAGE, TEXT, VIDEO, merged_tokens, rope_index
from starflow2_jax.vlm.text import QwenTextModel


def text_init_boxed(config: QwenTextConfig, rng: jax.Array, batch: int = 1, length: int = 4):
    """Flax variables of the text decoder with params boxed (``nn.Partitioned``, logical axis names)."""
    ids = jnp.zeros((batch, length), jnp.int32)
    return QwenTextModel(config.validate()).init(rng, ids)


@functools.partial(jax.jit, static_argnums=0)
def init_text(config: QwenTextConfig, rng: jax.Array) -> dict:
    """Fresh text-decoder params (plain arrays; the ``'params'`` collection's content)."""
    return nn.meta.unbox(text_init_boxed(config, rng))["params"]


def token_type_ids(config: QwenTextConfig, input_ids) -> np.ndarray:
    """(B, T) int32 ``mm_token_type_ids`` from the ids: 1 at ``<|image_pad|>``, 2 at ``<|video_pad|>``, else 0."""
    ids = np.asarray(input_ids)
    return np.where(ids == config.image_token_id, IMAGE, np.where(ids == config.video_token_id, VIDEO, TEXT)
                    ).astype(np.int32)


def scatter_features(embeds: jax.Array, token_mask: jax.Array, features: jax.Array) -> jax.Array:
    """``embeds`` (B, T, D) with the rows where ``token_mask`` (B, T) is True replaced, in row-major
    order, by the rows of ``features`` (N, D) (transformers' ``masked_scatter``). N must equal the
    number of True entries (checked by the callers, which know both numbers on the host)."""
    flat = token_mask.reshape(-1)
    order = jnp.clip(jnp.cumsum(flat) - 1, 0, max(features.shape[0] - 1, 0))
    picked = jnp.take(features.astype(embeds.dtype), order, axis=0).reshape(embeds.shape)
    return jnp.where(token_mask[..., None], picked, embeds)


def position_ids_for(config: QwenVLConfig, input_ids, mm_token_type_ids, image_grid_thw, attention_mask,
                     video_grid_thw=None, second_per_grid_ts=None) -> np.ndarray:
    """(3, B, T) int32 positions as transformers' forward builds them: ``rope_index`` when a grid is
    given, else ``arange(T)`` on every row (transformers ignores the attention mask there too)."""
    ids = np.asarray(input_ids)
    if image_grid_thw is None and video_grid_thw is None:
        return np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), (3,) + ids.shape).copy()
    positions, _ = rope_index(ids, mm_token_type_ids, image_grid_thw, config.vision.spatial_merge_size,
                              attention_mask, video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts,
                              tokens_per_second=config.vision.tokens_per_second)
    return positions


def forward(config: QwenVLConfig, params: dict, input_ids, pixel_values=None, image_grid_thw=None,
            mm_token_type_ids=None, attention_mask=None, *, image_features=None, position_ids=None,
            return_hidden: bool = False):
    """Logits (B, T, vocab) float32 of Qwen2.5-VL, equal to transformers' ``Qwen2_5_VLForConditionalGeneration``.

    input_ids: (B, T) with one ``<|image_pad|>`` per merged image token. pixel_values: the image
    processor's flattened patches (num_patches, C·tp·p·p) and image_grid_thw (num_images, 3) its
    grids; or image_features (num_merged_tokens, text hidden) precomputed vision-tower outputs in
    place of pixel_values. mm_token_type_ids (B, T): 0 text, 1 image, 2 video; derived from the
    ids when omitted (transformers would instead silently fall back to 1-D positions).
    attention_mask (B, T): 1 tokens, 0 padding. position_ids (3, B, T): overrides the computed ones.
    Returns logits, plus the final hidden states (B, T, D) when ``return_hidden``.
    """
    text = config.text
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids has shape {ids.shape}: expected (batch, length)")
    if pixel_values is not None and image_features is not None:
        raise ValueError("pass pixel_values or image_features, not both")
    types = token_type_ids(text, ids) if mm_token_type_ids is None else np.asarray(mm_token_type_ids)
    if types.shape != ids.shape:
        raise ValueError(f"mm_token_type_ids {types.shape} does not match input_ids {ids.shape}")
    if np.any((types == VIDEO) | (ids == text.video_token_id)):
        raise NotImplementedError("video inputs: the vision tower is wired for images only; "
                                  "positions.rope_index supports video grids")
    image_mask = ids == text.image_token_id
    n_tokens = int(image_mask.sum())
    if pixel_values is not None or image_features is not None:
        if image_grid_thw is None:
            raise ValueError("image inputs need image_grid_thw (num_images, 3)")
        expected = int(merged_tokens(image_grid_thw, config.vision.spatial_merge_size).sum())
        if n_tokens != expected:
            raise ValueError(f"{n_tokens} image tokens (id {text.image_token_id}) in input_ids but image_grid_thw "
                             f"{np.asarray(image_grid_thw).tolist()} gives {expected} merged image tokens")
        if not np.array_equal(types == IMAGE, image_mask):
            raise ValueError(f"mm_token_type_ids == 1 at {int(np.sum(types == IMAGE))} positions but input_ids "
                             f"holds {n_tokens} image tokens (id {text.image_token_id}); they must coincide")
    elif n_tokens:
        raise ValueError(f"input_ids holds {n_tokens} image tokens (id {text.image_token_id}) but neither "
                         f"pixel_values nor image_features was given")
    if position_ids is None:
        position_ids = position_ids_for(config, ids, types, image_grid_thw, attention_mask)
    if pixel_values is not None:
        from starflow2_jax.vlm.vision import vision_features  # the tower is optional for text-only use
        image_features = vision_features(config.vision, params["vision"], jnp.asarray(pixel_values),
                                         np.asarray(image_grid_thw))
    if image_features is not None and image_features.shape != (n_tokens, text.hidden_size):
        raise ValueError(f"image features have shape {tuple(image_features.shape)}: expected "
                         f"({n_tokens}, {text.hidden_size}) (one row per image token)")
    # device arrays (e.g. a batch already sharded over the mesh) are passed on as they are
    ids_in = input_ids if isinstance(input_ids, jax.Array) else jnp.asarray(ids, jnp.int32)
    mask = attention_mask if attention_mask is None or isinstance(attention_mask, jax.Array) else \
        jnp.asarray(attention_mask, jnp.int32)
    features = None if image_features is None or not n_tokens else jnp.asarray(image_features)
    return _forward(text, params["text"], ids_in, features, jnp.asarray(position_ids, jnp.int32), mask, return_hidden)


@functools.partial(jax.jit, static_argnums=(0, 6))
def _forward(config: QwenTextConfig, params, ids, features, position_ids, attention_mask, return_hidden):
    model = QwenTextModel(config)
    variables = {"params": params}
    embeds = model.apply(variables, ids, method=QwenTextModel.embed)
    if features is not None:
        embeds = scatter_features(embeds, ids == config.image_token_id, features)
    return model.apply(variables, inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask,
                       return_hidden=return_hidden)


def text_forward(config: QwenTextConfig, params: dict, input_ids=None, *, inputs_embeds=None, position_ids=None,
                 attention_mask=None, cache=None, return_hidden: bool = False):
    """The text decoder alone (jitted): ``QwenTextModel.__call__`` with text params (see there)."""
    return _text_forward(config, params, input_ids, inputs_embeds, position_ids, attention_mask, cache,
                         return_hidden)


@functools.partial(jax.jit, static_argnums=(0, 7))
def _text_forward(config, params, input_ids, inputs_embeds, position_ids, attention_mask, cache, return_hidden):
    return QwenTextModel(config).apply({"params": params}, input_ids, inputs_embeds=inputs_embeds,
                                       position_ids=position_ids, attention_mask=attention_mask, cache=cache,
                                       return_hidden=return_hidden)

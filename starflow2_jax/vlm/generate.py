"""Decoding: prefill the prompt into a fixed-size KV cache, then sample token by token in ONE jitted
``lax.while_loop`` (greedy, temperature, top-p; per-row stop tokens; early exit when every row stopped).

Positions follow transformers' generation: the prompt gets ``rope_index`` positions computed from
its attention mask (left padding skipped, images as 3-row grids), and generated token k (0-based) of
row b sits at ``rope_deltas[b] + n_valid[b] + k`` on all three rows (n_valid = unpadded prompt
length), i.e. right after the largest prompt position. The vision tower runs before the loop (it is
jitted on its own).

    out = generate(config, params, tokenizer, "Describe the image.", images=[image], max_new_tokens=64)
    out["ids"], out["lengths"], out["text"]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from starflow2_jax.vlm import inputs
from starflow2_jax.vlm.config import QwenTextConfig, QwenVLConfig
from starflow2_jax.vlm.model import scatter_features, token_type_ids
from starflow2_jax.vlm.positions import rope_index
from starflow2_jax.vlm.text import QwenTextModel, create_cache


def sample_logits(logits: jax.Array, key: jax.Array, temperature, top_p, greedy: bool) -> jax.Array:
    """Next tokens (B,) int32 from logits (B, V): argmax when ``greedy``, else a draw from
    softmax(logits / temperature) restricted to the smallest set of most likely tokens whose mass
    reaches ``top_p`` (nucleus sampling; the most likely token is always kept)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # (B, V) descending
    probs = jax.nn.softmax(ordered, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # mass before this token still short of top_p
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def decode(config: QwenTextConfig, max_new_tokens: int, greedy: bool, return_logits: bool, params, input_ids,
           features, position_ids, attention_mask, next_position, rng, temperature, top_p, stop_tokens, pad_id):
    """The jitted prefill + decoding loop.

    input_ids (B, T) left-padded, features (N, D) image features (None without images), position_ids
    (3, B, T), attention_mask (B, T), next_position (B,) = rope_deltas + n_valid, stop_tokens (S,)
    (−1 entries never match), pad_id: written after a row stopped. Returns ``(ids (B, max_new) int32,
    lengths (B,) int32 — tokens up to and including the stop token, logits (B, max_new, V) float32
    or None)``.
    """
    model = QwenTextModel(config)
    variables = {"params": params}
    batch, length = input_ids.shape
    embeds = model.apply(variables, input_ids, method=QwenTextModel.embed)
    if features is not None:
        embeds = scatter_features(embeds, input_ids == config.image_token_id, features)
    key_mask = jnp.pad(attention_mask.astype(bool), ((0, 0), (0, max_new_tokens)), constant_values=True)
    cache = create_cache(config, batch, length + max_new_tokens)
    logits, cache = model.apply(variables, inputs_embeds=embeds, position_ids=position_ids, attention_mask=key_mask,
                                cache=cache)
    last = logits[:, -1]  # (B, V): left padding puts every row's last token at T − 1
    token = sample_logits(last, jax.random.fold_in(rng, 0), temperature, top_p, greedy)
    finished = jnp.isin(token, stop_tokens)
    ids = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
    lengths = jnp.ones((batch,), jnp.int32)
    all_logits = (jnp.zeros((batch, max_new_tokens, config.vocab_size), jnp.float32).at[:, 0].set(last)
                  if return_logits else None)

    def keep_going(carry):
        k, _, finished, *_ = carry
        return (k < max_new_tokens) & ~jnp.all(finished)

    def step(carry):
        k, cache, finished, ids, lengths, all_logits = carry
        previous = ids[:, k - 1]
        positions = jnp.broadcast_to((next_position + k - 1)[None, :, None], (3, batch, 1))
        logits, cache = model.apply(variables, previous[:, None], position_ids=positions, attention_mask=key_mask,
                                    cache=cache)
        token = sample_logits(logits[:, 0], jax.random.fold_in(rng, k), temperature, top_p, greedy)
        token = jnp.where(finished, pad_id, token)
        ids = ids.at[:, k].set(token)
        lengths = lengths + (~finished).astype(jnp.int32)
        finished = finished | jnp.isin(token, stop_tokens)
        if all_logits is not None:
            all_logits = all_logits.at[:, k].set(logits[:, 0])
        return k + 1, cache, finished, ids, lengths, all_logits

    carry = (jnp.int32(1), cache, finished, ids, lengths, all_logits)
    _, _, _, ids, lengths, all_logits = jax.lax.while_loop(keep_going, step, carry)
    return ids, lengths, all_logits


def _prepare(config: QwenVLConfig, tokenizer, prompt_or_ids, images, image_processor, attention_mask,
             pixel_values, image_grid_thw) -> dict:
    """The left-padded batch (numpy) for ``generate``'s accepted prompt forms."""
    if isinstance(prompt_or_ids, dict):
        return dict(prompt_or_ids)
    is_text = isinstance(prompt_or_ids, str) or (isinstance(prompt_or_ids, (list, tuple)) and prompt_or_ids
                                                 and all(isinstance(p, str) for p in prompt_or_ids))
    if is_text:
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer (inputs.load_tokenizer(model_dir))")
        return inputs.encode(config, tokenizer, prompt_or_ids, images, image_processor=image_processor)
    if images is not None:
        raise ValueError("images= goes with text prompts; with token ids pass pixel_values= and image_grid_thw=")
    ids = np.asarray(prompt_or_ids)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"prompt_or_ids: expected a string, a list of strings or integer ids (B, T), got "
                         f"{ids.dtype} array of shape {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    batch = dict(input_ids=ids, attention_mask=mask,
                 mm_token_type_ids=np.where(mask == 1, token_type_ids(config.text, ids), 0))
    if pixel_values is not None:
        batch.update(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
    return batch


def generate(config: QwenVLConfig, params, tokenizer, prompt_or_ids, images=None, max_new_tokens: int = 32,
             temperature: float = 0.0, top_p: float = 1.0, stop_tokens=None, rng=None, *, image_processor=None,
             attention_mask=None, pixel_values=None, image_grid_thw=None, return_logits: bool = False) -> dict:
    """Generates up to ``max_new_tokens`` tokens per prompt.

    prompt_or_ids: a string or list of strings (tokenised with ``tokenizer``, ``images`` a list of
    images — or a list of lists for several strings — each marked by ``inputs.IMAGE_PLACEHOLDER``),
    token ids (T,) / (B, T) (left-padded; ``attention_mask``, ``pixel_values``, ``image_grid_thw``
    as for ``vlm.forward``), or an ``inputs.encode`` dict. temperature 0 is greedy; otherwise sampling
    with ``rng`` (default key 0) and nucleus ``top_p``. stop_tokens: ids that end a row (default the
    config's eos ids); rows continue until all stopped. Returns ``dict(ids=(B, max_new) int32 numpy,
    padded after the stop token, lengths=(B,) including the stop token, text=[decoded, special tokens
    skipped] or None without a tokenizer)``, plus ``logits`` (B, max_new, vocab) with ``return_logits``.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: expected >= 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature} (expected >= 0) / top_p={top_p} (expected in (0, 1])")
    text = config.text
    batch = _prepare(config, tokenizer, prompt_or_ids, images, image_processor, attention_mask, pixel_values,
                     image_grid_thw)
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
    types = np.asarray(batch.get("mm_token_type_ids", token_type_ids(text, ids)))
    if not mask[:, -1].all():
        raise ValueError(f"rows {np.flatnonzero(mask[:, -1] == 0).tolist()} end in padding: generate needs "
                         f"left-padded prompts (attention_mask 1 on the last position of every row)")
    grids = batch.get("image_grid_thw")
    n_image = int(np.sum(ids == text.image_token_id))
    if n_image and batch.get("pixel_values") is None:
        raise ValueError(f"the prompt holds {n_image} image tokens (id {text.image_token_id}) but no pixel_values")
    positions, deltas = rope_index(ids, types, grids, config.vision.spatial_merge_size, mask)  # checks the counts
    features = None
    if batch.get("pixel_values") is not None:
        from starflow2_jax.vlm.vision import vision_features
        features = vision_features(config.vision, params["vision"], jnp.asarray(batch["pixel_values"]),
                                   np.asarray(grids))
    stops = tuple(text.eos_token_ids) if stop_tokens is None else tuple(int(s) for s in stop_tokens)
    pad_id = text.pad_token_id if text.pad_token_id is not None else (stops[0] if stops else 0)
    out_ids, lengths, logits = decode(
        text, int(max_new_tokens), temperature == 0, bool(return_logits), params["text"],
        jnp.asarray(ids, jnp.int32), features, jnp.asarray(positions), jnp.asarray(mask, jnp.int32),
        jnp.asarray(deltas + mask.sum(axis=1), jnp.int32), jax.random.key(0) if rng is None else rng,
        jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p), jnp.asarray(stops or (-1,), jnp.int32),
        jnp.int32(pad_id))
    out_ids, lengths = np.asarray(out_ids), np.asarray(lengths)
    decoded = None if tokenizer is None else [tokenizer.decode(row[:n].tolist(), skip_special_tokens=True)
                                              for row, n in zip(out_ids, lengths)]
    result = dict(ids=out_ids, lengths=lengths, text=decoded)
    if return_logits:
        result["logits"] = np.asarray(logits)
    return result

"""``LMTask``: a Qwen2.5-VL text decoder trained from scratch by next-token prediction (the demo's stage 0).

The digits demo needs a "pretrained VLM" that stands in for Qwen2.5-VL-7B: this family trains the
text decoder (``vlm.QwenTextModel``) on the demo corpus (``data.demo_text``), tokenised by the demo
tokenizer (``data.demo_tokenizer``), and ``starflow2 convert to-hf`` exports the run as a Hugging Face
Qwen2.5-VL checkpoint (``train.lm_export``) that ``configs/starflow2.py`` loads as its frozen VLM.

Sequences are exactly what the frozen VLM reads in STARFlow2's stage 1: each document goes through
``pretzel.layout_document`` (chat documents through ``pretzel.chat_items``), so an image is
``<|vision_start|>``, N ``<|image_pad|>`` slots on an h×w grid of 3D positions (``model.lm.grid``),
``<|vision_end|>``, and the trained positions are the layout's ``text_loss``: every text token, and the
``<|vision_start|>`` of each image (the model learns where images go); slots never predict. Documents
are packed into rows of ``model.lm.seq_len`` (``data.packing``; attention stays within a document).

**What the slots hold** (``model.lm.images``):

- ``'none'``: the ``<|image_pad|>`` embedding — a text-only model that learns where images go but never
  sees one. Params: the text decoder's tree; the export writes the tower as initialised.
- ``'digits'`` (the demo's): the model is pretrained as a VLM, as Qwen2.5-VL was. Each image of a
  document is a **real** digit of its class from the embedded digits' train split (``data.digits``'
  fixed split; drawn anew per epoch; the 297 held-out digits are never used), read by the Qwen2.5-VL
  vision tower (``vlm.vision``, ``model.lm.vision``'s sizes), whose merged features replace the slot
  embeddings exactly as ``vlm.forward`` scatters them; tower and decoder train together. Pixels: the
  8×8 grey digit (0..16) scaled to 0..255 and repeated over RGB, patchified on the device as
  transformers' image processor does (``vlm.inputs.pixel_patches``), so the export, loaded by
  transformers with its ``preprocessor_config.json``, reads a digit as training did. The tower's patch
  and merge sizes must give ``model.lm.grid`` (8 / (patch·merge) per side), so the slots are the merged
  features in raster order, the layout STARFlow2's slots have. Params: ``{'text': ..., 'vision': ...}``.

Config (``model.lm``):

    vlm               dict of vlm.QwenTextConfig fields (default: pretzel.tiny's VLM); its marker ids
                      must be the tokenizer's (checked by ``resolve``)
    images            'none' or 'digits': what the slots hold (above)
    image_shift       with 'digits': each image translated by up to this many pixels (0..2, uniform per
                      axis, zero fill; ``augment_digit``) — the tower otherwise memorises the 1500 digits
    image_noise       with 'digits': each pixel's level dequantised by U(−½, ½) (stages 1–3's noise)
    vision            dict of vlm.QwenVisionConfig fields of the tower: trained with images 'digits',
                      else written by the export as initialised; out_hidden_size 0 = the text width
    tokenizer         'demo' (trained on the corpus at every start, deterministically) or a directory
                      with a Hugging Face tokenizer.json
    tokenizer_sha256  filled by ``resolve``: the SHA-256 of the tokenizer's JSON, checked by the export
    grid              [h, w]: the slot grid of one image (N = h·w slots; the demo: 8×8)
    corpus_seed, corpus_documents, corpus_weights   the corpus (``demo_text.demo_corpus``; corpus_weights
                      replaces ``demo_text.KIND_WEIGHTS`` for the kinds it names, {} = none)
    seq_len, packing_bins           packed rows
    dtype, remat      compute dtype and remat policy of the decoder

Loss: mean −log p of the trained next tokens (``pretzel.losses.token_nll``); metrics ``accuracy``
(arg-max next-token accuracy) and ``tokens`` (trained tokens per batch). ``eval_step`` gives per-row
``ntp_loss``. The family draws no images (``train.sample_every`` must be 0). At the start the trainer
logs ``corpus_summary`` (documents per kind, images, words, tokens, vocabulary size).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from starflow2_jax import pretzel
from starflow2_jax.fae.latent_space import PatchesSpace
from starflow2_jax.parallel import VLM_RULES
from starflow2_jax.pretzel.losses import token_nll
from starflow2_jax.pretzel.model import slot_latent_index
from starflow2_jax.train import config_fields as fields
from starflow2_jax.train.family import Family
from starflow2_jax.train.task import TaskBase
from starflow2_jax.vlm.config import QwenTextConfig, QwenVisionConfig
from starflow2_jax.vlm.text import QwenTextModel

BATCH_KEYS = ("tokens", "positions", "text_loss", "segment_ids")
IMAGE_KEYS = ("image_index", "pixels")  # with model.lm.images 'digits'
IMAGES = ("none", "digits")
DIGIT_SIZE = 8  # the embedded digits are 8×8
MARKER_FIELDS = {"<|image_pad|>": "image_token_id", "<|video_pad|>": "video_token_id",
                 "<|vision_start|>": "vision_start_token_id", "<|vision_end|>": "vision_end_token_id"}
# the tower the export writes (never trained): as small as a valid Qwen2.5-VL tower gets
TINY_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=0, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0])


# towers that read the 8×8 digits as STARFlow2's slots (grid = 8 / (patch · merge) per side)
DIGITS_VISION = {
    "tiny": dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=0, patch_size=2,
                 spatial_merge_size=2, temporal_patch_size=2, window_size=8, fullatt_block_indexes=[0]),
    "demo": dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=0, patch_size=1,
                 spatial_merge_size=2, temporal_patch_size=2, window_size=8, fullatt_block_indexes=[1]),
}

SIZES = ("tiny", "demo")


def vlm_fields(size: str) -> dict:
    """The text-decoder fields (``vlm.QwenTextConfig``, no dtype / remat) of the demo's VLM sizes, marker
    ids from the demo tokenizer (``data.demo_tokenizer.vlm_token_fields``): 'tiny' — pretzel.tiny's
    VLM (width 64, 2 layers) — and 'demo' — configs/starflow2.py:demo's (width 128, 4 layers of 4 heads
    of 32, 2 KV heads, MLP 256)."""
    from starflow2_jax.data.demo_tokenizer import vlm_token_fields

    shared = dict(vlm_token_fields(), max_position_embeddings=4096)
    if size == "tiny":
        return dict(shared, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                    mrope_section=(2, 3, 3))
    if size == "demo":
        return dict(shared, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                    mrope_section=(4, 6, 6))
    raise ValueError(f"demo VLM size {size!r}: expected one of {SIZES}")


# ---- config → model, tokenizer, corpus ---------------------------------------------------------
def vlm_config_from(section) -> QwenTextConfig:
    """The ``QwenTextConfig`` of ``model.lm`` (its ``vlm`` fields, ``dtype``, ``remat``)."""
    values = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dict(section.vlm).items()}
    values.update(dtype=section.dtype, remat=section.remat)
    try:
        return QwenTextConfig(**values).validate()
    except (TypeError, ValueError) as error:
        raise ValueError(f"model.lm.vlm={dict(section.vlm)}: {error}") from error


def vision_config_from(section) -> QwenVisionConfig:
    """The ``QwenVisionConfig`` the export writes (``model.lm.vision``; out_hidden_size 0 → the text width)."""
    values = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dict(section.vision).items()}
    if not values.get("out_hidden_size"):
        values["out_hidden_size"] = int(section.vlm.hidden_size)
    try:
        return QwenVisionConfig(**values)
    except TypeError as error:
        raise ValueError(f"model.lm.vision={dict(section.vision)}: {error}") from error


def layout_config(vlm_config: QwenTextConfig, grid, seq_len: int) -> pretzel.PretzelConfig:
    """A ``PretzelConfig`` whose layout is the LM's: the VLM, an image of h×w slots (a 1-channel
    h×w 'image' as 1×1 patches: the LM never reads pixels) and rows of ``seq_len``."""
    gh, gw = (int(g) for g in grid)
    return pretzel.PretzelConfig(vlm=vlm_config, latent=PatchesSpace(gh, gw, 1, 1), seq_len=int(seq_len),
                                 max_images=max(1, int(seq_len) // (gh * gw + 2))).validate()


@functools.lru_cache(maxsize=4)
def corpus(seed: int, documents: int, weights: tuple = ()) -> tuple:
    """The demo corpus of ``model.lm.corpus_seed`` / ``corpus_documents`` / ``corpus_weights`` (as sorted
    (kind, weight) pairs; cached per process)."""
    from starflow2_jax.data.demo_text import demo_corpus

    return tuple(demo_corpus(int(seed), int(documents), dict(weights)))


def corpus_key(section) -> tuple:
    """``(corpus_seed, corpus_documents, corpus_weights as sorted (kind, weight) pairs)`` of ``model.lm``:
    the arguments of the cached ``corpus`` and demo tokenizer."""
    weights = tuple(sorted((str(k), float(v)) for k, v in dict(section.get("corpus_weights", {}) or {}).items()))
    return int(section.corpus_seed), int(section.corpus_documents), weights


def corpus_of(section) -> tuple:
    """The corpus ``model.lm`` describes."""
    return corpus(*corpus_key(section))


@functools.lru_cache(maxsize=4)
def _demo_tokenizer(seed: int, documents: int, weights: tuple = ()):
    from starflow2_jax.data.demo_tokenizer import demo_tokenizer

    return demo_tokenizer(corpus(seed, documents, weights))


def tokenizer_of(section):
    """The ``tokenizers.Tokenizer`` of ``model.lm.tokenizer`` ('demo': trained on the corpus)."""
    if section.tokenizer == "demo":
        return _demo_tokenizer(*corpus_key(section))
    import os

    import tokenizers

    path = os.path.join(section.tokenizer, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.lm.tokenizer={section.tokenizer!r}: no tokenizer.json there (expected "
                                f"'demo' or a Hugging Face tokenizer directory)")
    return tokenizers.Tokenizer.from_file(path)


def tokenizer_sha256(tokenizer) -> str:
    """The SHA-256 (hex) of the tokenizer's JSON serialisation."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def special_ids(vlm_config: QwenTextConfig) -> dict[str, int]:
    """Marker → the id the VLM config gives it (``<|im_end|>`` = the first EOS, ``<|endoftext|>`` = padding)."""
    ids = {name: getattr(vlm_config, field) for name, field in MARKER_FIELDS.items()}
    if vlm_config.eos_token_ids:
        ids["<|im_end|>"] = vlm_config.eos_token_ids[0]
    if vlm_config.pad_token_id is not None:
        ids["<|endoftext|>"] = vlm_config.pad_token_id
    return ids


def digits_grid(vision: QwenVisionConfig) -> tuple[int, int]:
    """The slot grid (h, w) of an 8×8 digit read by ``vision``: 8 / (patch · merge) per side."""
    side = DIGIT_SIZE // (vision.patch_size * vision.spatial_merge_size)
    return side, side


def check_digits_vision(vision: QwenVisionConfig, grid, text_width: int) -> None:
    """ValueError (naming the field) unless ``vision`` can read the 8×8 digits as ``grid``'s slots for a text
    decoder of width ``text_width``."""
    from starflow2_jax.vlm.vision import check_config

    try:
        check_config(vision)
    except ValueError as error:
        raise ValueError(f"model.lm.vision: {error}") from error
    if digits_grid(vision) != tuple(grid) or DIGIT_SIZE % (vision.patch_size * vision.spatial_merge_size):
        raise ValueError(f"model.lm.vision: patch_size={vision.patch_size} and spatial_merge_size="
                         f"{vision.spatial_merge_size} do not read an 8×8 digit as model.lm.grid={list(grid)} merged "
                         f"features; expected patch·merge = 8 / grid side")
    if vision.in_channels != 3:
        raise ValueError(f"model.lm.vision.in_channels={vision.in_channels}: expected 3 (digits are read as RGB, "
                         f"as the image processor gives them)")
    if vision.out_hidden_size != text_width:
        raise ValueError(f"model.lm.vision.out_hidden_size={vision.out_hidden_size}: expected the text width "
                         f"{text_width} (or 0)")


@functools.lru_cache(maxsize=1)
def digits_pool():
    """The embedded digits' train split as a ``data.digits_documents.DigitsPool`` (scikit-learn's arrays and
    ``data.digits.digits_split_indices``, the split the TFDS builder writes; no files read)."""
    from sklearn.datasets import load_digits

    from starflow2_jax.data.digits import NUM_CLASSES, digits_split_indices
    from starflow2_jax.data.digits_documents import DigitsPool

    digits = load_digits()
    indices = digits_split_indices()["train"]
    images = digits.images[indices].astype(np.uint8)[..., None]  # (n, 8, 8, 1), grey levels 0..16
    labels = digits.target[indices].astype(np.int64)
    return DigitsPool(images, labels, indices, tuple(np.flatnonzero(labels == d) for d in range(NUM_CLASSES)))


def augment_digit(image, rng: np.random.Generator, *, shift: int = 0, noise: bool = False) -> np.ndarray:
    """A grey digit (8, 8[, 1]) with levels 0..16 → float64 (8, 8): translated by (dy, dx), each drawn
    uniformly from [−shift, shift] (the pixels moved in are 0), then with ``noise`` each pixel's level v
    dequantised to v + U(−½, ½), clipped to [0, 16]. Draws from ``rng`` only what it uses."""
    grey = np.asarray(image, np.float64).reshape(DIGIT_SIZE, DIGIT_SIZE)
    if shift:
        dy, dx = (int(v) for v in rng.integers(-shift, shift + 1, size=2))
        moved = np.zeros_like(grey)
        moved[max(dy, 0):DIGIT_SIZE + min(dy, 0), max(dx, 0):DIGIT_SIZE + min(dx, 0)] = \
            grey[max(-dy, 0):DIGIT_SIZE + min(-dy, 0), max(-dx, 0):DIGIT_SIZE + min(-dx, 0)]
        grey = moved
    if noise:
        grey = np.clip(grey + rng.uniform(-0.5, 0.5, grey.shape), 0.0, 16.0)
    return grey


def digit_rgb(images) -> np.ndarray:
    """Grey digits (…, 8, 8[, 1]) with levels 0..16 → (…, 8, 8, 3) uint8 0..255 (rounded, grey on RGB)."""
    grey = np.asarray(images, np.float64)
    if grey.shape[-1] == 1:
        grey = grey[..., 0]
    return np.repeat(np.rint(grey * (255.0 / 16.0)).astype(np.uint8)[..., None], 3, axis=-1)


def document_items(document, grid) -> list:
    """A ``demo_text.DemoDocument`` as ``pretzel.layout_document`` items: text trained, images zero
    placeholders (targets: the model learns to open them), chat documents in the chat template."""
    from starflow2_jax.data.demo_text import DigitImage

    gh, gw = (int(g) for g in grid)

    def item(x):
        return pretzel.Image(np.zeros((gh, gw, 1), np.float32)) if isinstance(x, DigitImage) else pretzel.Text(x)

    if not document.chat:
        return [item(x) for _, items in document.turns for x in items]
    chat = pretzel.chat_items([(role, [item(x) for x in items]) for role, items in document.turns])
    # pretraining: every token is read and predicted, the system and user turns included
    return [dataclasses.replace(i, loss=True) if isinstance(i, pretzel.Text) else
            dataclasses.replace(i, target=True) for i in chat]


@dataclasses.dataclass
class LMLayout:
    """A corpus document → the per-token arrays the packer takes (grain random-map transform). With a
    ``pool`` (images 'digits') each image is a real digit of its class drawn with ``rng``: ``pixels``
    (n, 8, 8, 3) uint8, in the document's image order (the layout's ``image_index``)."""

    config: pretzel.PretzelConfig
    encode: object
    pool: object = None  # data.digits_documents.DigitsPool
    shift: int = 0  # augment_digit's
    noise: bool = False

    def __call__(self, document, rng) -> dict[str, np.ndarray]:
        from starflow2_jax.data.demo_text import DigitImage

        try:
            doc = pretzel.layout_document(self.config, document_items(document, self.config.grid),
                                          encode=self.encode)
        except ValueError as error:
            raise ValueError(f"model.lm.seq_len={self.config.seq_len}: a {document.kind!r} document of the corpus "
                             f"does not fit a row: {error}") from error
        out = {k: doc[k] for k in ("tokens", "positions", "text_loss", "image_index", "image_target")}
        if self.pool is not None:
            digits = [x.digit for _, items in document.turns for x in items if isinstance(x, DigitImage)]
            picked = [augment_digit(self.pool.images[self.pool.pick(d, rng)], rng, shift=self.shift, noise=self.noise)
                      for d in digits]
            out["pixels"] = digit_rgb(np.stack(picked)) if picked else np.zeros((0, DIGIT_SIZE, DIGIT_SIZE, 3),
                                                                                 np.uint8)
        return out


def packing_spec(pcfg: pretzel.PretzelConfig, bins: int, images: bool = False):
    """The LM's rows: tokens, 3D positions, loss mask (pads: token 0, no loss), the images' index and,
    with ``images``, their pixels (pads: black)."""
    from starflow2_jax.data.packing import PackingSpec

    image_fields = dict(image_target=False, pixels=0) if images else dict(image_target=False)
    return PackingSpec(length=pcfg.seq_len, max_images=pcfg.max_images,
                       token_fields=dict(tokens=0, positions=0, text_loss=False, image_index=-1),
                       image_fields=image_fields, bins=int(bins))


def make_train_data(config, workdir: str):
    """This process's endless, shuffled stream of batches of packed LM rows (``BATCH_KEYS`` and more)."""
    del workdir  # the corpus lives in memory
    from starflow2_jax.data.pipeline import make_packed_pipeline

    s = config.model.lm
    pcfg = layout_config(vlm_config_from(s), s.grid, int(s.seq_len))
    tokenizer = tokenizer_of(s)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    images = s.images == "digits"
    return make_packed_pipeline(list(corpus_of(s)),
                                spec=packing_spec(pcfg, int(s.packing_bins), images),
                                batch_size=int(config.data.batch_size), seed=int(config.seed), shuffle=True,
                                preprocess=LMLayout(pcfg, encode, digits_pool() if images else None,
                                                    int(s.image_shift), bool(s.image_noise)),
                                num_epochs=None, drop_remainder=True, worker_count=int(config.data.worker_count))


# ---- the task ----------------------------------------------------------------------------------
class LMTask(TaskBase):
    """A ``Task`` (see ``train.task``): next-token prediction with the Qwen2.5-VL text decoder, reading
    the slots through the vision tower when ``vision_config`` is given (images 'digits')."""

    rules = VLM_RULES

    def __init__(self, vlm_config: QwenTextConfig, seq_len: int = 256, vision_config: QwenVisionConfig | None = None,
                 grid=(2, 2)):
        self.vlm_config = vlm_config.validate()
        self.seq_len = int(seq_len)
        self.vision_config = vision_config
        self.grid = tuple(int(g) for g in grid)
        self.layout = layout_config(self.vlm_config, self.grid, self.seq_len)
        if vision_config is not None:
            check_digits_vision(vision_config, self.grid, self.vlm_config.hidden_size)

    @classmethod
    def from_config(cls, config) -> "LMTask":
        s = config.model.lm
        vision = vision_config_from(s) if s.images == "digits" else None
        return cls(vlm_config_from(s), int(s.seq_len), vision, tuple(s.grid))

    def init(self, rng):
        from starflow2_jax.vlm.model import text_init_boxed

        text = text_init_boxed(self.vlm_config, rng)["params"]
        if self.vision_config is None:
            return text, {}
        from starflow2_jax.vlm.vision import init_vision_boxed

        return {"text": text, "vision": init_vision_boxed(self.vision_config, jax.random.fold_in(rng, 1))["params"]}, {}

    def prepare_batch(self, batch):
        keys = BATCH_KEYS + (IMAGE_KEYS if self.vision_config is not None else ())
        missing = [k for k in keys if k not in batch]
        if missing:
            raise ValueError(f"batch lacks {missing} (fields: {sorted(batch)}); expected packed LM rows "
                             f"(train.tasks.lm.make_train_data)")
        out = {k: np.asarray(batch[k]) for k in keys}
        tokens = out["tokens"]
        if tokens.ndim != 2 or out["positions"].shape != tokens.shape + (3,):
            raise ValueError(f"tokens {tokens.shape} and positions {out['positions'].shape}: expected (B, L) and "
                             f"(B, L, 3)")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vlm_config.vocab_size):
            raise ValueError(f"token ids in [{tokens.min()}, {tokens.max()}] fall outside the vocabulary "
                             f"[0, {self.vlm_config.vocab_size})")
        if self.vision_config is not None:
            pixels = out["pixels"]
            digit = (DIGIT_SIZE, DIGIT_SIZE, 3)
            if pixels.ndim != 5 or pixels.shape[0] != tokens.shape[0] or pixels.shape[2:] != digit:
                raise ValueError(f"pixels {pixels.shape}: expected (B={tokens.shape[0]}, M, {DIGIT_SIZE}, "
                                 f"{DIGIT_SIZE}, 3) uint8 digits")
            if out["image_index"].shape != tokens.shape:
                raise ValueError(f"image_index {out['image_index'].shape}: expected {tokens.shape} like tokens")
        return out

    def slot_features(self, vision_params, pixels) -> jax.Array:
        """pixels (B, M, 8, 8, 3) uint8 → the tower's merged features (B, M·N, text width), image by image,
        each image's N features in raster order of its slot grid."""
        from starflow2_jax.vlm.inputs import pixel_grids, pixel_patches
        from starflow2_jax.vlm.vision import VisionTower, vision_layout

        b, m = pixels.shape[:2]
        # one image's layout, the tower vmapped over the B·M images: attention within each image only,
        # where the concatenated layout would attend over all B·M·64 patches through segment masks
        layout = vision_layout(self.vision_config, pixel_grids(self.vision_config, 1, DIGIT_SIZE, DIGIT_SIZE))
        patches = pixel_patches(pixels.reshape((b * m,) + pixels.shape[2:]), self.vision_config)
        patches = patches.reshape(b * m, layout.num_patches, -1)
        tower = VisionTower(self.vision_config)
        features = jax.vmap(lambda x: tower.apply({"params": vision_params}, x, *layout.arrays()))(patches)
        return features.reshape(b, -1, features.shape[-1])

    def _terms(self, params, batch):
        """(B, L) −log p of each trained next token, its mask and whether the arg-max was right."""
        model = QwenTextModel(self.vlm_config)
        variables = {"params": params if self.vision_config is None else params["text"]}
        positions = jnp.moveaxis(batch["positions"], -1, 0)  # (3, B, L)
        if self.vision_config is None:
            hidden = model.apply(variables, batch["tokens"], position_ids=positions,
                                 segment_ids=batch["segment_ids"], method=QwenTextModel.hidden_states)
        else:
            embeds = model.apply(variables, batch["tokens"], method=QwenTextModel.embed)
            features = self.slot_features(params["vision"], batch["pixels"])  # (B, M·N, D)
            slot = batch["image_index"] >= 0
            m = batch["pixels"].shape[1]
            index = slot_latent_index(self.layout, slot, batch["image_index"], m)
            padded = jnp.concatenate([features, jnp.zeros_like(features[:, :1])], axis=1)
            picked = jnp.take_along_axis(padded, index[..., None], axis=1).astype(embeds.dtype)
            embeds = jnp.where(slot[..., None], picked, embeds)
            hidden = model.apply(variables, inputs_embeds=embeds, position_ids=positions,
                                 segment_ids=batch["segment_ids"], method=QwenTextModel.hidden_states)
        logits = model.apply(variables, hidden, method=QwenTextModel.logits)  # (B, L, V) float32
        mask = batch["text_loss"].astype(bool)
        nll = token_nll(logits, batch["tokens"], mask)
        nxt = jnp.concatenate([batch["tokens"][:, 1:], jnp.zeros_like(batch["tokens"][:, :1])], axis=1)
        right = mask & (jnp.argmax(logits, axis=-1) == nxt)
        return nll, mask, right

    def loss(self, params, extra, batch, rng):
        del extra, rng
        nll, mask, right = self._terms(params, batch)
        count = jnp.sum(mask)
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        loss = jnp.sum(nll) / denom
        return loss, {"loss": loss, "accuracy": jnp.sum(right) / denom, "tokens": count.astype(jnp.float32)}

    def eval_step(self, params, extra, batch, rng):
        """Per row: 'ntp_loss', the mean −log p of its trained tokens (NaN where it has none)."""
        del extra, rng
        nll, mask, _ = self._terms(params, batch)
        return {"ntp_loss": jnp.sum(nll, axis=1) / jnp.sum(mask, axis=1)}

    def example_batch(self, batch_size: int) -> dict:
        """A zero packed batch of ``batch_size`` rows of ``model.lm.seq_len`` (for ``starflow2 aot``)."""
        length = self.seq_len
        batch = dict(tokens=np.zeros((batch_size, length), np.int32),
                     positions=np.zeros((batch_size, length, 3), np.int32),
                     text_loss=np.ones((batch_size, length), bool), segment_ids=np.ones((batch_size, length), np.int32))
        if self.vision_config is not None:
            batch.update(image_index=np.full((batch_size, length), -1, np.int32),
                         pixels=np.zeros((batch_size, self.layout.max_images, DIGIT_SIZE, DIGIT_SIZE, 3), np.uint8))
        return batch


# ---- the 'lm' family ---------------------------------------------------------------------------
def add_defaults(config: ml_collections.ConfigDict) -> None:
    """The ``model.lm`` section (pretzel.tiny's VLM, the demo tokenizer, 2×2 slots, rows of 256)."""
    vlm = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(pretzel.tiny().vlm).items()
           if k not in ("dtype", "remat")}
    config.model.lm = ml_collections.ConfigDict(dict(
        vlm=ml_collections.ConfigDict(vlm), images="none", vision=ml_collections.ConfigDict(TINY_VISION),
        tokenizer="demo", tokenizer_sha256="", grid=[2, 2], corpus_seed=0, corpus_documents=4000,
        corpus_weights=ml_collections.ConfigDict(), image_shift=0, image_noise=False, seq_len=256, packing_bins=16,
        dtype="float32", remat="none"))


def validate(config) -> None:
    """Checks ``model.lm``; ValueError naming the field."""
    p = "model.lm"
    fields.dict_field(config, f"{p}.vlm", "a dict of vlm.QwenTextConfig fields")
    fields.choice(config, f"{p}.images", IMAGES)
    fields.dict_field(config, f"{p}.vision", "a dict of vlm.QwenVisionConfig fields")
    if fields.int_field(config, f"{p}.image_shift", 0) > 2:
        raise ValueError(f"{p}.image_shift={config.model.lm.image_shift}: expected 0..2 pixels (an 8×8 digit)")
    if not isinstance(fields.get(config, f"{p}.image_noise"), bool):
        raise ValueError(f"{p}.image_noise={config.model.lm.image_noise!r}: expected True or False")
    fields.string_field(config, f"{p}.tokenizer", "'demo' or a Hugging Face tokenizer directory")
    fields.string_field(config, f"{p}.tokenizer_sha256", "'' (filled by the trainer) or a hex digest")
    grid = fields.get(config, f"{p}.grid")
    if isinstance(grid, str) or len(grid) != 2 or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0
                                                          for g in grid):
        raise ValueError(f"{p}.grid={grid!r}: expected [h, w], two positive ints (the slot grid of an image)")
    fields.int_field(config, f"{p}.corpus_seed", 0)
    fields.int_field(config, f"{p}.corpus_documents", 7)
    fields.dict_field(config, f"{p}.corpus_weights", "a dict {kind: weight} (demo_text.KINDS)")
    from starflow2_jax.data.demo_text import kind_weights

    try:
        kind_weights(dict(config.model.lm.corpus_weights))
    except ValueError as error:
        raise ValueError(f"{p}.corpus_weights={dict(config.model.lm.corpus_weights)}: {error}") from error
    fields.int_field(config, f"{p}.seq_len", 1)
    fields.int_field(config, f"{p}.packing_bins", 1)
    fields.choice(config, f"{p}.dtype", fields.DTYPES)
    fields.choice(config, f"{p}.remat", fields.REMAT)
    if fields.int_field(config, "train.sample_every", 0):
        raise ValueError(f"train.sample_every={config.train.sample_every}: the 'lm' family draws no sample grids; "
                         f"expected 0")
    vlm_config_from(config.model.lm)
    per_image = grid[0] * grid[1] + 2
    if per_image > config.model.lm.seq_len:
        raise ValueError(f"{p}.seq_len={config.model.lm.seq_len}: one image of {grid[0]}×{grid[1]} slots (+2 "
                         f"markers) does not fit a row")
    vision = vision_config_from(config.model.lm)
    if config.model.lm.images == "digits":
        check_digits_vision(vision, grid, int(config.model.lm.vlm.hidden_size))


def resolve(config) -> None:
    """Checks the tokenizer against the VLM config (every marker at the id ``model.lm.vlm`` gives it, the
    vocabulary no larger than the model's) and records its SHA-256 in ``model.lm.tokenizer_sha256``
    (a resume with another tokenizer is then a config mismatch). Idempotent."""
    s = config.model.lm
    vlm_config = vlm_config_from(s)
    tokenizer = tokenizer_of(s)
    wrong = {name: (tokenizer.token_to_id(name), want) for name, want in special_ids(vlm_config).items()
             if tokenizer.token_to_id(name) != want}
    if wrong:
        raise ValueError(f"model.lm.tokenizer={s.tokenizer!r} does not fit model.lm.vlm: " + ", ".join(
            f"{name} is id {have} there, the config says {want}" for name, (have, want) in wrong.items()))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vlm_config.vocab_size:
        raise ValueError(f"model.lm.tokenizer={s.tokenizer!r} has {size} ids; model.lm.vlm.vocab_size="
                         f"{vlm_config.vocab_size} is smaller")
    digest = tokenizer_sha256(tokenizer)
    if s.tokenizer_sha256 and s.tokenizer_sha256 != digest:
        raise ValueError(f"model.lm.tokenizer_sha256={s.tokenizer_sha256!r}, but the tokenizer "
                         f"{s.tokenizer!r} gives {digest!r} (another tokenizer, or a tokenizers version that "
                         f"trains the demo tokenizer differently)")
    s.tokenizer_sha256 = digest


def _train_data(config, workdir: str):
    """The packed rows, after reading one batch (a document longer than a row is an error before the
    trainer writes anything)."""
    data = make_train_data(config, workdir)
    next(iter(data))
    logging.info("corpus: %s", json.dumps(corpus_summary(config)))
    return data


def corpus_summary(config) -> dict:
    """``demo_text.corpus_summary`` of the run's corpus with its tokenizer (tokens at ``model.lm.grid``'s
    slots per image) plus ``vocab_size``: what the trainer logs and the demo prints."""
    from starflow2_jax.data.demo_text import corpus_summary as summary

    s = config.model.lm
    tokenizer = tokenizer_of(s)
    out = summary(corpus_of(s),
                  encode=lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
                  num_slots=int(s.grid[0]) * int(s.grid[1]))
    out["vocab_size"] = tokenizer.get_vocab_size(with_added_tokens=True)
    return out


def _next_steps(config, workdir: str) -> str:
    del config
    return (f"  export it: starflow2 convert to-hf --workdir {workdir} --out DIR\n"
            f"  then: --config.model.starflow2.vlm_checkpoint=DIR (its tokenizer comes along)")


FAMILY = Family(name="lm", add_defaults=add_defaults, validate=validate, make_task=LMTask.from_config,
                resolve=resolve, next_steps=_next_steps, train_data=_train_data)

"""STARFlow2's training data: stored documents → the Pretzel layout → packed rows (``data.packing``).

Every ``data.builder`` works: image–text pairs ('digits', 'photos', 'directory', 'image_text': the
document caption → image) and interleaved documents ('interleaved', the JSONL builder), and the digits
demo's documents ('digits_documents': ``data.digits_documents``, the ``demo_text`` templates with real
digits of the train split, drawn afresh every epoch; ``data.kinds`` or the kinds
``model.starflow2.pairs`` reads). Per document (``LayoutPreprocess``, a grain random-map transform
inside ``data.pipeline.make_packed_pipeline``): ``data.documents.DocumentPreprocess`` (decode, scale to
[−1, 1], resize to ``data.image_size`` / ``data.channels``, noise, a random caption of a pair), each
image converted to the latent space's shape (channels, integer resize) when it is not yet, then
``pretzel.layout_document`` with the config's tokenizer (text items with ``loss`` False are context). Rows of ``model.starflow2.seq_len`` positions
and ``max_images`` images; a document that can never fit is an error naming it (or dropped with
``model.starflow2.overflow='drop'``). Caption dropout for guidance happens in the loss
(``pretzel.losses.caption_dropout``: the text masked out of attention, SPEC §5.3), not here.

Tokenizers (``model.starflow2.tokenizer``): 'bytes' — UTF-8 bytes as ids (0..244; the tiny and demo
VLMs' vocabulary of 256 keeps its special tokens above) — or a Hugging Face tokenizer directory
(``tokenizer.json``; '' = ``model.starflow2.vlm_checkpoint``'s).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

import numpy as np

from starflow2_jax import pretzel

BYTE_LIMIT = 245  # UTF-8 never uses bytes 0xF5..0xFF


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as token ids (vocabularies of >= 245 whose special tokens lie above 244)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < BYTE_LIMIT).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (read on first use; special markers map to their ids)."""

    def __init__(self, directory: str):
        self.directory = directory
        self._tok = None

    def _load(self):
        if self._tok is None:
            import tokenizers

            path = os.path.join(self.directory, "tokenizer.json")
            if not self.directory:
                raise ValueError("model.starflow2.tokenizer='' reads the tokenizer.json of "
                                 "model.starflow2.vlm_checkpoint, which is empty too: give the VLM directory (the "
                                 "digits demo: stage 0's `starflow2 convert to-hf` output) or tokenizer='bytes'")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"model.starflow2.tokenizer: no tokenizer.json in {self.directory!r}")
            self._tok = tokenizers.Tokenizer.from_file(path)
        return self._tok

    def encode(self, text: str) -> list[int]:
        return list(self._load().encode(text, add_special_tokens=False).ids)

    def decode(self, ids) -> str:
        return self._load().decode([int(i) for i in ids], skip_special_tokens=False)


def make_tokenizer(config):
    """The tokenizer ``model.starflow2.tokenizer`` names (see the module docstring)."""
    s = config.model.starflow2
    if s.tokenizer == "bytes":
        vlm = s.vlm
        specials = [vlm[k] for k in ("image_token_id", "vision_start_token_id", "vision_end_token_id")]
        if int(vlm.vocab_size) < BYTE_LIMIT or min(specials) < BYTE_LIMIT:
            raise ValueError(f"model.starflow2.tokenizer='bytes' needs vlm.vocab_size >= {BYTE_LIMIT} and the special "
                             f"tokens {specials} >= {BYTE_LIMIT}; give a Hugging Face tokenizer directory instead")
        return ByteTokenizer()
    return HFTokenizer(s.tokenizer or s.vlm_checkpoint)


def _to_shape(image: np.ndarray, shape: tuple) -> np.ndarray:
    from starflow2_jax.data.preprocess import convert_channels, resize_square

    height, width, channels = shape
    if image.shape[-1] != channels:
        image = convert_channels(image, channels)
    if image.shape[:2] != (height, width):
        if height != width:
            raise ValueError(f"image of {image.shape[:2]}: the latent space takes {height}×{width}")
        image = resize_square(image, height)
    return image.astype(np.float32)


@dataclasses.dataclass
class LayoutPreprocess:
    """A stored example → one Pretzel document (``pretzel.layout_document``'s dict), see the module doc."""

    config: pretzel.PretzelConfig
    documents: Any  # data.documents.DocumentPreprocess
    encode: Callable[[str], list[int]]
    pairs: str = "t2i"  # an image–text pair as caption → image ('t2i'), image → caption ('i2t'), or either

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        doc = self.documents(example, rng)
        shape = tuple(self.config.latent.image_shape)
        items = [pretzel.Text(item["text"], loss=bool(item.get("loss", True))) if "text" in item else
                 pretzel.Image(_to_shape(item["image"], shape), target=bool(item["target"]))
                 for item in doc["items"]]
        if doc.get("pair", "kinds" not in example):  # documents with their own order keep it
            order = self.pairs if self.pairs != "mixed" else ("t2i", "i2t")[int(rng.integers(2))]
            if order == "i2t":  # understanding: the image is context, the caption trained
                items = [pretzel.Image(i.pixels, target=False) for i in items if isinstance(i, pretzel.Image)] + \
                    [i for i in items if isinstance(i, pretzel.Text)]
        try:
            return pretzel.layout_document(self.config, items, encode=self.encode)
        except ValueError as error:
            raise ValueError(f"document {int(doc['index'])}: {error}") from error


def packing_spec(config: pretzel.PretzelConfig, *, bins: int = 16, overflow: str = "error"):
    """The ``data.packing.PackingSpec`` of Pretzel rows (pad: token 0 / not a slot / no image / no loss)."""
    from starflow2_jax.data.packing import PackingSpec

    return PackingSpec(length=config.seq_len, max_images=max(config.max_images, 1),
                       token_fields=dict(tokens=0, positions=0, slot=False, image_index=-1, text_loss=False),
                       image_fields=dict(images=0.0, image_target=False), bins=bins, overflow=overflow)


def make_source(config, split: str, workdir):
    """The random-access source of ``split``: the pair builders of ``train.inputs``, the JSONL builders
    ('interleaved', 'image_text': built once from ``data.source`` into ``data.data_dir``), or for
    'digits_documents' the embedded digits' pairs of ``split`` (training draws its documents from the
    'train' split's digits; ``starflow2 eval bpd`` reads the held-out 'test' digits as caption → image)."""
    from starflow2_jax.train import inputs

    d = config.data
    if d.builder == "digits_documents":
        return inputs.make_source(config, split, workdir, builder="digits")
    if d.builder not in ("interleaved", "image_text"):
        return inputs.make_source(config, split, workdir)
    if not d.source:
        raise ValueError(f"data.source is empty: data.builder={d.builder!r} builds its dataset from a JSONL file"
                         + (" (or a folder of class folders)" if d.builder == "image_text" else ""))
    from starflow2_jax.data.check import NamedSource
    from starflow2_jax.parallel import process_0_first

    size = int(config.model.starflow2.latent.image_size)
    if d.builder == "interleaved":
        from starflow2_jax.data.interleaved import build_interleaved as build
    else:
        from starflow2_jax.data.image_text import build_image_text as build
    where = inputs.data_dir(config, workdir)
    builder = process_0_first(lambda: build(d.source, where, size), f"starflow2_jax.starflow2_data.{d.builder}")
    return NamedSource(builder.as_data_source(split), builder.data_dir, split, value=where)


def longest_digits_documents(pcfg: pretzel.PretzelConfig, encode, kinds, pairs: str) -> dict[str, tuple]:
    """Per kind of ``data.digits_documents``: ``(positions, images, text)`` of its longest document laid out
    for ``pcfg`` with ``encode`` (every document the kind can draw, ``document_space``, is laid out)."""
    from starflow2_jax.data import demo_text
    from starflow2_jax.data import digits_documents as dd

    roomy = dataclasses.replace(pcfg, seq_len=1 << 30, max_images=1 << 10)  # measure, never refuse
    blank = np.zeros(tuple(pcfg.latent.image_shape), np.float32)
    out = {}
    for kind in kinds:
        longest = (0, 0, "")
        for document in dd.document_space(kind, pairs):
            items = [pretzel.Text(i["text"], loss=i["loss"]) if "text" in i else pretzel.Image(blank)
                     for i in dd.document_items(document)]
            size = (len(pretzel.layout_document(roomy, items, encode=encode)["tokens"]), len(document.digits))
            if size > longest[:2]:
                longest = size + (demo_text.render(document, 1),)
        out[kind] = longest
    return out


def check_digits_documents_fit(pcfg: pretzel.PretzelConfig, encode, kinds, pairs: str) -> None:
    """ValueError naming ``model.starflow2.seq_len`` / ``max_images`` when the longest document of one of
    ``kinds`` does not fit a row (``longest_digits_documents``)."""
    for kind, (length, images, text) in longest_digits_documents(pcfg, encode, kinds, pairs).items():
        shown = text.replace("\n", " ")[:120]
        if images > pcfg.max_images:
            raise ValueError(f"model.starflow2.max_images={pcfg.max_images}: data.builder='digits_documents' draws "
                             f"{kind!r} documents of up to {images} images ({shown!r}); expected max_images >= "
                             f"{images}, or data.kinds without {kind!r}")
        if length > pcfg.seq_len:
            raise ValueError(f"model.starflow2.seq_len={pcfg.seq_len}: the longest {kind!r} document of "
                             f"data.builder='digits_documents' is {length} positions ({shown!r}, {images} images of "
                             f"{pcfg.num_slots} slots); expected seq_len >= {length}, or data.kinds without {kind!r}")


def digits_documents(config, workdir, pcfg: pretzel.PretzelConfig, encode, documents):
    """``(source, documents transform)`` of data.builder='digits_documents': ``DOCUMENTS_PER_EPOCH``
    indices and ``data.digits_documents.DigitsDocuments`` over the train split's digits; the longest
    document of each kind is checked against the row first (before any dataset file is written)."""
    from starflow2_jax.data import digits_documents as dd

    d, s = config.data, config.model.starflow2
    kinds = dd.stage_kinds(str(s.pairs), tuple(d.kinds))
    check_digits_documents_fit(pcfg, encode, kinds, str(s.pairs))
    pool = dd.DigitsPool.from_source(make_source(config, d.split, workdir))
    return dd.index_source(), dd.DigitsDocuments(pool, kinds, str(s.pairs), documents)


def make_train_data(config, workdir, pcfg: pretzel.PretzelConfig):
    """This process's endless, shuffled stream of batches of packed Pretzel rows of the model ``pcfg``
    (``train.tasks.starflow2.pretzel_config_from(config)``)."""
    from starflow2_jax.data.documents import DocumentPreprocess
    from starflow2_jax.data.pipeline import make_packed_pipeline

    d, s = config.data, config.model.starflow2
    documents = DocumentPreprocess(levels=int(d.levels), noise=d.noise, noise_std=float(d.noise_std),
                                   image_size=int(d.image_size), channels=int(d.channels))
    encode = make_tokenizer(config).encode
    if d.builder == "digits_documents":
        source, documents = digits_documents(config, workdir, pcfg, encode, documents)
    else:
        source = make_source(config, d.split, workdir)
    preprocess = LayoutPreprocess(pcfg, documents, encode, pairs=str(s.pairs))
    return make_packed_pipeline(source, spec=packing_spec(pcfg, bins=int(s.packing_bins), overflow=str(s.overflow)),
                                batch_size=int(d.batch_size), seed=int(config.seed), shuffle=True,
                                preprocess=preprocess, num_epochs=None, drop_remainder=True,
                                worker_count=int(d.worker_count))

"""A TFDS builder for interleaved documents (text and images in any order), written as ArrayRecord.

Source: one **JSONL file** per split (``build_interleaved(source=...)`` takes a path for a single
``train`` split, or a mapping ``{split: path}``). Each non-blank line is one document, a non-empty
JSON list of items::

    [{"text": "A cat:"}, {"image": "cat.png"}, {"text": "and the same cat, asleep:"},
     {"image": "/data/asleep.jpg", "target": false}]

- ``{"text": STRING}``: a non-empty text segment;
- ``{"image": PATH}``: PATH absolute or relative to the JSONL file's folder; an optional
  ``"target": true | false`` says whether the image is a **generation target** (its likelihood is
  trained) or **context** only (read, not trained). Default ``true``: every image of a document is
  a target unless marked otherwise, as in caption→image data; mark the input images of
  understanding or editing documents ``false``.

Every line is checked before anything is written; an error names the file, the line (and item)
and what was expected: bad JSON, not a list, an empty document, an item that is neither text nor
image (or both, or has unknown keys), a bad ``target``, a missing image file. Unreadable image
files are reported (with file and line) while writing, and TFDS writes into a temporary folder that
is renamed only on success, so a bad input leaves no partial dataset.

Every image is resized like ``build_image_text``'s (the central square, resized to ``image_size``²,
bicubic) and stored as PNG RGB. An example is::

    kinds         int8   (k,)          the items in order: 0 = text, 1 = image (``TEXT``, ``IMAGE``)
    texts         [str]  (k_text,)     the text items in order
    images        PNG    (n, S, S, 3)  the image items in order (n may be 0)
    image_target  bool   (n,)          per image: a generation target (True) or context (False)
    index         int64                the document's line order among the split's documents

``document_items(example)`` turns a stored example back into the item list.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from starflow2_jax.data.image_text import _NAME_PATTERN
from starflow2_jax.data.images import encode_png, load_rgb, resize_and_center_crop

TEXT, IMAGE = 0, 1
DEFAULT_TARGET = True


class _Document(NamedTuple):
    kinds: tuple[int, ...]
    texts: tuple[str, ...]
    images: tuple[Path, ...]
    targets: tuple[bool, ...]
    origin: str  # "file.jsonl:LINE", for error messages


@dataclasses.dataclass(eq=False)
class InterleavedConfig(tfds.core.BuilderConfig):
    """Builder config: ``sources`` = ((split, absolute JSONL path), ...), ``image_size`` = image side in pixels."""

    sources: tuple[tuple[str, str], ...] = ()
    image_size: int = 0


def _parse_item(item: Any, where: str, folder: Path) -> tuple[int, Any, bool]:
    """``(kind, text or image path, target)`` of one JSON item; ValueError naming ``where`` otherwise."""
    expected = 'expected {"text": STRING} or {"image": PATH} with an optional "target": true|false'
    if not isinstance(item, dict):
        raise ValueError(f"{where}: item {json.dumps(item)[:80]}; {expected}")
    kinds = [key for key in ("text", "image") if key in item]
    if len(kinds) != 1:
        raise ValueError(f"{where}: unknown item kind, keys {sorted(item)}; {expected}")
    allowed = {"text"} if kinds == ["text"] else {"image", "target"}
    if set(item) - allowed:
        raise ValueError(f"{where}: unexpected keys {sorted(set(item) - allowed)} in a {kinds[0]} item; {expected}")
    if kinds == ["text"]:
        if not isinstance(item["text"], str) or not item["text"]:
            raise ValueError(f"{where}: \"text\" {item['text']!r}; expected a non-empty string")
        return TEXT, item["text"], False
    if not isinstance(item["image"], str) or not item["image"]:
        raise ValueError(f"{where}: \"image\" {item['image']!r}; expected a path string")
    target = item.get("target", DEFAULT_TARGET)
    if not isinstance(target, bool):
        raise ValueError(f"{where}: \"target\" {target!r}; expected true or false")
    path = Path(item["image"]).expanduser()
    path = path if path.is_absolute() else folder / path
    if not path.is_file():
        raise ValueError(f"{where}: image file {str(path)!r} does not exist")
    return IMAGE, path, target


def _parse_document(line: str, where: str, folder: Path) -> _Document:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error})") from error
    if not isinstance(record, list):
        raise ValueError(f"{where}: expected a JSON list of items [{{\"text\": ...}}, {{\"image\": ...}}, ...], "
                         f"got {line.strip()[:80]!r}")
    if not record:
        raise ValueError(f"{where}: empty document []; expected at least one text or image item")
    kinds, texts, images, targets = [], [], [], []
    for number, item in enumerate(record):
        kind, value, target = _parse_item(item, f"{where}: item {number}", folder)
        kinds.append(kind)
        if kind == TEXT:
            texts.append(value)
        else:
            images.append(value)
            targets.append(target)
    return _Document(tuple(kinds), tuple(texts), tuple(images), tuple(targets), where)


def read_documents(path: str | os.PathLike) -> list[_Document]:
    """Every document of the JSONL file ``path``, checked (see the module doc); blank lines are skipped."""
    path = Path(path)
    documents = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                documents.append(_parse_document(line, f"{path}:{number}", path.parent))
    if not documents:
        raise ValueError(f"JSONL file {str(path)!r} lists no documents")
    return documents


class Starflow2Interleaved(tfds.core.GeneratorBasedBuilder):
    """TFDS builder ``starflow2_interleaved``: text–image documents (module doc), ``InterleavedConfig``."""

    name = "starflow2_interleaved"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "JSONL documents of text and image items, images center-cropped to PNG RGB."}

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        size = config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "kinds": tfds.features.Sequence(np.int8),
                "texts": tfds.features.Sequence(tfds.features.Text()),
                "images": tfds.features.Sequence(tfds.features.Image(shape=(size, size, 3), encoding_format="png")),
                "image_target": tfds.features.Sequence(np.bool_),
                "index": np.int64,
            }),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(sources={split: path for split, path in config.sources}, image_size=size),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        listings = {split: read_documents(path) for split, path in self.builder_config.sources}  # all checked first
        return {split: self._generate_examples(documents) for split, documents in listings.items()}

    def _generate_examples(self, documents: list[_Document]):
        size = self.builder_config.image_size
        for index, document in enumerate(documents):
            images = []
            for path in document.images:
                try:
                    images.append(encode_png(np.asarray(resize_and_center_crop(load_rgb(path), size))))
                except ValueError as error:
                    raise ValueError(f"{document.origin}: {error}") from error
            yield index, {
                "kinds": list(document.kinds),
                "texts": list(document.texts),
                "images": images,
                "image_target": list(document.targets),
                "index": index,
            }


def document_items(example: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The item list of a stored example: ``[{'text': str} | {'image': uint8 (S, S, 3), 'target': bool}, ...]``.

    An example with an optional ``text_loss`` (bool per text; generated documents such as
    ``data.digits_documents``' have one, stored JSONL documents do not) gives its text items a ``loss``
    flag (False: context, not trained). Raises ValueError when ``kinds`` does not match the numbers of
    texts and images (and ``text_loss`` flags).
    """
    kinds = [int(kind) for kind in example["kinds"]]
    texts, images, targets = list(example["texts"]), list(example["images"]), list(example["image_target"])
    losses = list(example["text_loss"]) if "text_loss" in example else None
    if kinds.count(TEXT) != len(texts) or kinds.count(IMAGE) != len(images) or len(images) != len(targets) \
            or len(kinds) != len(texts) + len(images) or (losses is not None and len(losses) != len(texts)):
        raise ValueError(f"interleaved example {example.get('index', '?')}: kinds {kinds} do not match "
                         f"{len(texts)} texts, {len(images)} images and {len(targets)} image_target flags"
                         + ("" if losses is None else f" and {len(losses)} text_loss flags"))
    items, text_iter, image_iter = [], iter(texts), iter(zip(images, targets))
    loss_iter = iter(losses) if losses is not None else None
    for kind in kinds:
        if kind == TEXT:
            text = next(text_iter)
            items.append({"text": text.decode("utf-8") if isinstance(text, bytes) else str(text)})
            if loss_iter is not None:
                items[-1]["loss"] = bool(next(loss_iter))
        else:
            image, target = next(image_iter)
            items.append({"image": np.asarray(image), "target": bool(target)})
    return items


def _normalise_sources(source: str | os.PathLike | Mapping[str, str | os.PathLike]) -> tuple[tuple[str, str], ...]:
    sources = source if isinstance(source, Mapping) else {"train": source}
    if not sources:
        raise ValueError("build_interleaved: source mapping is empty; expected {split: JSONL path}")
    normalised = []
    for split, path in sources.items():
        if not isinstance(split, str) or not _NAME_PATTERN.fullmatch(split):
            raise ValueError(f"build_interleaved: split name {split!r}; expected letters, digits and underscores")
        path = Path(path).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"build_interleaved: source {str(path)!r} (split {split!r}) is not a file; "
                             "expected a JSONL file")
        if path.suffix.lower() not in (".jsonl", ".json"):
            raise ValueError(f"build_interleaved: source {str(path)!r} is not .jsonl; expected a JSONL file")
        normalised.append((split, str(path)))
    return tuple(normalised)


def build_interleaved(
    source: str | os.PathLike | Mapping[str, str | os.PathLike],
    data_dir: str | os.PathLike,
    image_size: int,
    name: str = "default",
) -> Starflow2Interleaved:
    """Prepares (once) and returns the ``starflow2_interleaved`` builder for config ``name`` in ``data_dir``.

    ``source`` is a JSONL file (one split, ``train``) or ``{split: path}``; ``image_size`` the image
    side in pixels. Files land in ``data_dir/starflow2_interleaved/{name}/1.0.0``; a later call with
    the same name reuses them, and raises ValueError if they were built from other sources or at
    another size. Read a split with ``builder.as_data_source(split)``: examples as in the module doc
    (``images`` a list of uint8 ``(S, S, 3)``, ``texts`` a list of bytes), or turn them into
    documents with ``DocumentPreprocess``.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"build_interleaved: image_size {image_size!r}; expected a positive int")
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise ValueError(f"build_interleaved: name {name!r}; expected letters, digits and underscores")
    config = InterleavedConfig(name=name, sources=_normalise_sources(source), image_size=int(image_size),
                               description=f"image_size={int(image_size)}")
    builder = Starflow2Interleaved(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    if builder.is_prepared():
        built = builder.info.metadata
        wanted = {"sources": dict(config.sources), "image_size": config.image_size}
        if built.get("sources") != wanted["sources"] or built.get("image_size") != wanted["image_size"]:
            raise ValueError(f"build_interleaved: dataset {name!r} in {builder.data_dir} was built from "
                             f"{built.get('sources')} at image_size {built.get('image_size')}, not from "
                             f"{wanted['sources']} at {wanted['image_size']}; use another name or delete it")
    builder.download_and_prepare()
    return builder

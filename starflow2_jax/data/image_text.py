"""A TFDS builder for users' own image–text data, resized and center-cropped, written as ArrayRecord.

Two kinds of source, one per split (``build_image_text(source=...)`` takes a path for a single
``train`` split, or a mapping ``{split: path}``):

- a **JSONL file**: one JSON object per line, ``{"image": PATH, "text": CAPTION}``. PATH is absolute
  or relative to the JSONL file's folder; ``text`` is a string or a non-empty list of strings (the
  pipeline picks one at random); an optional int ``"label"`` (default -1 = unlabelled). Blank lines
  are skipped.
- a **folder of class subfolders**: ``ROOT/CLASS/*.{png,jpg,...}`` (searched recursively inside each
  class folder; hidden entries and other file types are skipped). Classes are the sorted union of
  the subfolder names over all splits, the label is the class's position, the caption is
  ``"a photo of a {class}"`` (underscores shown as spaces).

Every example is ``{'image': PNG RGB (S, S, 3), 'label': int64, 'captions': [str, ...], 'index':
int64}``; ``index`` is the example's position in its listing (JSONL line order, or sorted files),
and records are stored in that order. Resizing: the shorter side to ``image_size`` (bicubic), then
a center crop. The whole listing is checked before anything is written, and TFDS writes into a
temporary folder that is renamed only on success, so a bad input leaves no partial dataset.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Mapping, NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from starflow2_jax.data.images import encode_png, load_rgb, resize_and_center_crop

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]*")


class _Item(NamedTuple):
    path: Path
    captions: tuple[str, ...]
    label: int
    origin: str  # where the item was listed ("file.jsonl:LINE" or the class folder), for error messages


@dataclasses.dataclass(eq=False)
class ImageTextConfig(tfds.core.BuilderConfig):
    """Builder config: ``sources`` = ((split, absolute path), ...), ``image_size`` = output side in pixels."""

    sources: tuple[tuple[str, str], ...] = ()
    image_size: int = 0


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _class_names(roots: list[Path]) -> list[str]:
    names = set()
    for root in roots:
        names.update(child.name for child in root.iterdir() if child.is_dir() and not _is_hidden(child))
    return sorted(names)


def _read_folder(root: Path, class_names: list[str]) -> list[_Item]:
    items = []
    classes = sorted(child for child in root.iterdir() if child.is_dir() and not _is_hidden(child))
    if not classes:
        raise ValueError(f"image folder {str(root)!r} has no class subfolders; expected ROOT/CLASS/IMAGE files")
    for folder in classes:
        files = sorted(path for path in folder.rglob("*")
                       if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
                       and not any(part.startswith(".") for part in path.relative_to(folder).parts))
        if not files:
            raise ValueError(f"class folder {str(folder)!r} has no image files (suffixes {IMAGE_SUFFIXES})")
        caption = f"a photo of a {folder.name.replace('_', ' ')}"
        items.extend(_Item(path, (caption,), class_names.index(folder.name), str(folder)) for path in files)
    return items


def _parse_line(line: str, where: str, folder: Path) -> _Item:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error})") from error
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object {{\"image\": ..., \"text\": ...}}, got {line.strip()!r}")
    if not isinstance(record.get("image"), str) or not record["image"]:
        raise ValueError(f"{where}: missing \"image\" (a path string); got keys {sorted(record)}")
    text = record.get("text")
    captions = (text,) if isinstance(text, str) else tuple(text) if isinstance(text, list) else None
    if not captions or not all(isinstance(caption, str) for caption in captions):
        raise ValueError(f"{where}: \"text\" {text!r}; expected a string or a non-empty list of strings")
    label = record.get("label", -1)
    if isinstance(label, bool) or not isinstance(label, int) or label < -1:
        raise ValueError(f"{where}: \"label\" {label!r}; expected an int >= 0 (or -1 for none)")
    path = Path(record["image"]).expanduser()
    path = path if path.is_absolute() else folder / path
    if not path.is_file():
        raise ValueError(f"{where}: image file {str(path)!r} does not exist")
    return _Item(path, captions, label, where)


def _read_jsonl(path: Path) -> list[_Item]:
    items = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                items.append(_parse_line(line, f"{path}:{number}", path.parent))
    if not items:
        raise ValueError(f"JSONL file {str(path)!r} lists no images")
    return items


class Starflow2ImageText(tfds.core.GeneratorBasedBuilder):
    """TFDS builder ``starflow2_image_text``: users' image–text pairs (see module doc); config ``ImageTextConfig``."""

    name = "starflow2_image_text"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "JSONL or class-folder sources, shorter side resize + center crop, PNG RGB."}

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        roots = [Path(path) for _, path in config.sources if Path(path).is_dir()]
        class_names = _class_names(roots) if roots else []
        size = config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                "label": np.int64,
                "captions": tfds.features.Sequence(tfds.features.Text()),
                "index": np.int64,
            }),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(
                sources={split: path for split, path in config.sources},
                image_size=size,
                class_names=class_names,
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        class_names = self.info.metadata["class_names"]
        listings = {}
        for split, path in self.builder_config.sources:  # read and check every listing before writing anything
            path = Path(path)
            listings[split] = _read_folder(path, class_names) if path.is_dir() else _read_jsonl(path)
        return {split: self._generate_examples(items) for split, items in listings.items()}

    def _generate_examples(self, items: list[_Item]):
        size = self.builder_config.image_size
        for index, item in enumerate(items):
            try:
                image = resize_and_center_crop(load_rgb(item.path), size)
            except ValueError as error:
                raise ValueError(f"{item.origin}: {error}") from error
            yield index, {
                "image": encode_png(np.asarray(image)),
                "label": item.label,
                "captions": list(item.captions),
                "index": index,
            }


def _normalise_sources(source: str | os.PathLike | Mapping[str, str | os.PathLike]) -> tuple[tuple[str, str], ...]:
    sources = source if isinstance(source, Mapping) else {"train": source}
    if not sources:
        raise ValueError("build_image_text: source mapping is empty; expected {split: path}")
    normalised = []
    for split, path in sources.items():
        if not isinstance(split, str) or not _NAME_PATTERN.fullmatch(split):
            raise ValueError(f"build_image_text: split name {split!r}; expected letters, digits and underscores")
        path = Path(path).expanduser().resolve()
        if not path.exists():
            raise ValueError(f"build_image_text: source {str(path)!r} (split {split!r}) does not exist")
        if path.is_file() and path.suffix.lower() not in (".jsonl", ".json"):
            raise ValueError(f"build_image_text: source {str(path)!r} is a file but not .jsonl; "
                             "expected a JSONL file or a folder of class subfolders")
        normalised.append((split, str(path)))
    return tuple(normalised)


def build_image_text(
    source: str | os.PathLike | Mapping[str, str | os.PathLike],
    data_dir: str | os.PathLike,
    image_size: int,
    name: str = "default",
) -> Starflow2ImageText:
    """Prepares (once) and returns the ``starflow2_image_text`` builder for config ``name`` in ``data_dir``.

    ``source`` is a JSONL file or a class-folder root (one split, ``train``) or ``{split: path}``;
    ``image_size`` the output side in pixels. Files land in
    ``data_dir/starflow2_image_text/{name}/1.0.0``; a later call with the same name reuses them, and
    raises ValueError if they were built from other sources or at another size. Read a split with
    ``builder.as_data_source(split)``: examples ``{'image': uint8 (S, S, 3), 'label': int,
    'captions': list[bytes], 'index': int}``; class names are ``builder.info.metadata['class_names']``.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"build_image_text: image_size {image_size!r}; expected a positive int")
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise ValueError(f"build_image_text: name {name!r}; expected letters, digits and underscores")
    config = ImageTextConfig(name=name, sources=_normalise_sources(source), image_size=int(image_size),
                             description=f"image_size={int(image_size)}")
    builder = Starflow2ImageText(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    if builder.is_prepared():
        built = builder.info.metadata
        wanted = {"sources": dict(config.sources), "image_size": config.image_size}
        if built.get("sources") != wanted["sources"] or built.get("image_size") != wanted["image_size"]:
            raise ValueError(f"build_image_text: dataset {name!r} in {builder.data_dir} was built from "
                             f"{built.get('sources')} at image_size {built.get('image_size')}, not from "
                             f"{wanted['sources']} at {wanted['image_size']}; use another name or delete it")
    builder.download_and_prepare()
    return builder

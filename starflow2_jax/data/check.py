"""Static checks of a prepared TFDS dataset directory, with errors that name the file and the config field.

``check_dataset_dir(path, field=..., splits=...)`` runs before a pipeline reads anything (and before
a training run writes anything), so a missing or damaged dataset is one clear ValueError instead of
a TFDS or Riegeli traceback from inside the input pipeline. ``field`` is the config field that
points at ``path`` (e.g. ``data.data_dir``); every message starts with ``field=path``.

What is checked, cheaply (no record is decoded): the directory exists and holds ``dataset_info.json``
(if not, the prepared datasets found below it are suggested); TFDS can read that metadata; the
dataset is stored as ArrayRecord; each requested split exists; each of its shard files exists and
its ArrayRecord footer and index read back with the record count the metadata promises (a
truncated file fails here). Not checked: the bytes of every record (a flipped byte inside a chunk
is found only when that record is read; reading every record would cost a full pass), so
``NamedSource`` wraps a data source and names the file, record and field when a read fails.
Missing or damaged files raise ``DatasetError`` (a ValueError).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

INFO_FILE = "dataset_info.json"


class DatasetError(ValueError):
    """A dataset directory or file that is missing or damaged (not a wrong argument such as an unknown split)."""


def _prepared_below(path: Path, depth: int = 3, limit: int = 3) -> list[str]:
    """Up to ``limit`` folders at most ``depth`` levels below ``path`` that hold a ``dataset_info.json``."""
    found = []
    for root, dirs, files in os.walk(path):
        if len(Path(root).relative_to(path).parts) >= depth:
            dirs.clear()
        if INFO_FILE in files and Path(root) != path:
            found.append(root)
            if len(found) == limit:
                break
        dirs.sort()
    return found


def check_dataset_dir(path: str | os.PathLike, *, field: str = "data.data_dir",
                      splits: Sequence[str] | None = None, value: str | os.PathLike | None = None) -> None:
    """Raises ``DatasetError`` (a ValueError: ``"{field}={path!r}: ..."``, naming the bad file) unless ``path``
    is an intact prepared TFDS ArrayRecord dataset; a plain ValueError if it lacks one of ``splits``
    (default: all of its splits); see the module doc.

    ``value``: what ``field`` holds when it is not ``path`` itself (e.g. the ``data_dir`` a builder
    writes ``NAME/VERSION`` under); messages then start ``{field}={value!r} ({path})``.
    """
    import tensorflow_datasets as tfds
    from array_record.python.array_record_module import ArrayRecordReader

    path = Path(path).expanduser()
    where = f"{field}={str(path)!r}" if value is None else f"{field}={os.fspath(value)!r} ({path})"
    expected = f"expected a prepared TFDS dataset directory (NAME/[CONFIG/]VERSION holding {INFO_FILE})"
    if not path.is_dir():
        raise DatasetError(f"{where}: {'is not a directory' if path.exists() else 'does not exist'}; {expected}")
    if not (path / INFO_FILE).is_file():
        contents = sorted(entry.name for entry in path.iterdir())
        found = _prepared_below(path)
        hint = f"; did you mean {' or '.join(repr(f) for f in found)}?" if found else ""
        held = f"holds {contents[:5]}{' ...' if len(contents) > 5 else ''}" if contents else "is empty"
        raise DatasetError(f"{where}: no {INFO_FILE} (the directory {held}); {expected}{hint}")
    try:
        json.loads((path / INFO_FILE).read_text(encoding="utf-8"))
        info = tfds.builder_from_directory(os.fspath(path)).info
    except Exception as error:  # noqa: BLE001 - any failure to read the metadata is reported with the file
        raise DatasetError(f"{where}: {path / INFO_FILE} is unreadable or corrupt ({type(error).__name__}: "
                         f"{str(error)[:200]})") from error
    file_format = getattr(info.file_format, "value", info.file_format)
    if file_format != "array_record":
        raise ValueError(f"{where}: the dataset is stored as {file_format!r}; expected 'array_record' (grain reads "
                         "ArrayRecord files without TensorFlow); prepare it with file_format='array_record'")
    available = sorted(info.splits.keys())
    for split in available if splits is None else splits:
        if split not in info.splits:
            raise ValueError(f"{where}: the dataset has no split {split!r}; it has {available}")
        split_info = info.splits[split]
        for file, records in zip(split_info.filepaths, split_info.shard_lengths):
            file = Path(os.fspath(file))
            if not file.is_file():
                raise DatasetError(f"{where}: file {file.name} of split {split!r} is missing ({INFO_FILE} lists it "
                                 f"with {records} records); the dataset is incomplete, prepare it again")
            reason = None
            try:
                reader = ArrayRecordReader(os.fspath(file))
                try:
                    found = reader.num_records()
                    if found != records:
                        reason = f"it holds {found} of the {records} records {INFO_FILE} lists"
                finally:
                    reader.close()
            except Exception as error:  # noqa: BLE001 - Riegeli reports damage as RuntimeError/OSError
                reason = f"{type(error).__name__}: {str(error)[:200]}"
            if reason:
                raise DatasetError(f"{where}: file {file.name} of split {split!r} is damaged (truncated or corrupt: "
                                 f"{reason}); prepare the dataset again")


class NamedSource:
    """A random-access data source whose read errors name the file, the record and the config field.

    Wraps ``source`` (a TFDS ``ArrayRecordDataSource`` of ``split`` in the dataset directory ``path``):
    ``len`` and indexing pass through; an exception while reading record ``i`` (e.g. Riegeli's
    "chunk data hash mismatch" for a flipped byte, which ``check_dataset_dir`` does not read far
    enough to see) becomes a ``DatasetError`` naming ``field``, the shard file holding record ``i``
    and ``i``.
    """

    def __init__(self, source, path: str | os.PathLike, split: str, field: str = "data.data_dir",
                 value: str | os.PathLike | None = None):
        self._source = source
        self._where = f"{field}={os.fspath(path)!r}" if value is None else f"{field}={os.fspath(value)!r} ({path})"
        self._split = split
        info = getattr(source, "dataset_info", None)
        split_info = info.splits[split] if info is not None and split in info.splits else None
        self._files = [Path(os.fspath(f)).name for f in split_info.filepaths] if split_info else []
        self._ends = list(np.cumsum(split_info.shard_lengths)) if split_info else []

    def __len__(self) -> int:
        return len(self._source)

    def _file_of(self, index: int) -> str:
        for file, end in zip(self._files, self._ends):
            if index < end:
                return f"file {file}"
        return f"one of the files {self._files}" if self._files else "a file"

    def __getitem__(self, index):
        try:
            return self._source[index]
        except (IndexError, KeyError):
            raise
        except Exception as error:  # noqa: BLE001 - Riegeli/decoding failures: name what is broken
            raise DatasetError(f"{self._where}: record {int(index)} of split {self._split!r} "
                               f"({self._file_of(int(index))}) cannot be read ({type(error).__name__}: "
                               f"{str(error)[:200]}); the file is damaged, prepare the dataset again") from error

    def __getitems__(self, indices):
        return [self[index] for index in indices]

    def __repr__(self) -> str:
        return f"NamedSource({self._source!r})"

"""Outputs that appear complete or not at all: files (bytes, text, JSON, NPZ, PNG) and directories.

Every writer here writes into a hidden temporary beside the target (same directory, so the final
``os.replace`` is an atomic rename on one file system), flushes it to disk (``fsync``), renames it over
the target and then syncs the directory. If anything fails before the rename — the serialiser raises,
the disk fills up, ``KeyboardInterrupt`` — the temporary is removed and the target is left as it was
(absent, or the previous complete file). Readers therefore only ever see a whole old or a whole new
output. A hard kill (SIGKILL, power loss) cannot run clean-up code: it may leave a hidden
``.NAME.<hex>.tmp…`` beside the target, never a partial target.

    output_path(path)       context manager: a temporary path to write to (for writers that need a
                            file name, e.g. ``safetensors.numpy.save_file``, ``torch.save``)
    output_file(path, mode) context manager: an open temporary file ('wb' or 'w')
    write_bytes / write_text / write_json / write_npz / write_png    one call per kind
    output_directory(dir)   context manager: a temporary directory renamed to ``dir`` (which must be
                            absent or empty) once everything in it is written

Parent directories are created as needed. This module imports nothing else from the package, so every
layer (``data``, ``convert``, ``train``, ``eval``, ``bench``, ``cli``) may use it; numpy and PIL are
imported only by the writers that need them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

TMP_TAG = ".tmp"  # every temporary's name starts with '.' and contains this tag


def _temporary_beside(target: Path) -> Path:
    """A fresh hidden name in ``target``'s directory that keeps ``target``'s suffix (some writers, like
    ``np.savez``, append their suffix to names that lack it)."""
    return target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}{TMP_TAG}{target.suffix}")


def _sync_directory(directory: Path) -> None:
    """Makes a rename inside ``directory`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _check_file_target(path: Path) -> Path:
    if path.is_dir():
        raise IsADirectoryError(f"cannot write the file {os.fspath(path)!r}: a directory of that name exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def output_path(path: os.PathLike | str) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` for the caller to write one file to. On a normal exit the
    file is fsynced and renamed to ``path`` (replacing an existing file); on an exception it is removed
    and ``path`` is unchanged. Raises FileNotFoundError if the caller wrote nothing there."""
    target = _check_file_target(Path(path))
    tmp = _temporary_beside(target)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"atomic write of {os.fspath(target)!r}: nothing was written to {os.fspath(tmp)!r}")
        _fsync_file(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
    _sync_directory(target.parent)


@contextlib.contextmanager
def output_file(path: os.PathLike | str, mode: str = "wb", encoding: str = "utf-8") -> Iterator[IO]:
    """Yields an open temporary file (``mode`` 'wb' or 'w'; text in ``encoding``) that becomes ``path``
    on a normal exit, as ``output_path`` describes."""
    if mode not in ("wb", "w"):
        raise ValueError(f"output_file: mode {mode!r}; expected 'wb' or 'w'")
    with output_path(path) as tmp:
        with open(tmp, mode, **({} if mode == "wb" else {"encoding": encoding})) as f:
            yield f


def write_bytes(path: os.PathLike | str, data: bytes) -> str:
    """Writes ``data`` to ``path`` atomically; returns the path (a str)."""
    with output_file(path, "wb") as f:
        f.write(data)
    return os.fspath(path)


def write_text(path: os.PathLike | str, text: str, encoding: str = "utf-8") -> str:
    """Writes ``text`` to ``path`` atomically; returns the path (a str)."""
    with output_file(path, "w", encoding=encoding) as f:
        f.write(text)
    return os.fspath(path)


def write_json(path: os.PathLike | str, obj: Any, indent: int | None = 2, sort_keys: bool = False,
               allow_nan: bool = False) -> str:
    """Writes ``obj`` as JSON (plus a final newline) to ``path`` atomically; returns the path.

    NaN and infinities are refused (ValueError) unless ``allow_nan``: they are not JSON. The object
    is serialised before anything is created, so an unserialisable value leaves no trace either.
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan)
    return write_text(path, text + "\n")


def write_npz(path: os.PathLike | str, arrays: Mapping[str, Any]) -> str:
    """Writes ``arrays`` (name → array-like) to the ``.npz`` file ``path`` (uncompressed ``np.savez``)
    atomically; returns the path. ValueError unless ``path`` ends in ``.npz``."""
    import numpy as np

    if not os.fspath(path).endswith(".npz"):
        raise ValueError(f"write_npz: {os.fspath(path)!r} must end in .npz")
    with output_file(path, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    return os.fspath(path)


def write_png(path: os.PathLike | str, image: Any) -> str:
    """Writes a uint8 (H, W, 1|3) image to the PNG file ``path`` atomically; returns the path.
    ValueError for any other dtype or shape."""
    import numpy as np
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"write_png: expected a uint8 (H, W, 1|3) image, got {image.dtype} {image.shape}")
    with output_file(path, "wb") as f:
        Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(f, format="PNG")
    return os.fspath(path)


def check_output_directory(out_dir: os.PathLike | str) -> Path:
    """``out_dir`` as a Path; FileExistsError unless it is absent or an empty directory."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"output directory {os.fspath(out_dir)} exists and is not an empty directory")
    return out_dir


@contextlib.contextmanager
def output_directory(out_dir: os.PathLike | str) -> Iterator[Path]:
    """Yields a fresh hidden directory beside ``out_dir`` to write into. On a normal exit every file in
    it is fsynced and it is renamed to ``out_dir`` (which must be absent or empty: FileExistsError
    otherwise, checked before and after writing); on an exception it is removed and ``out_dir`` is left
    untouched."""
    out_dir = check_output_directory(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_beside(out_dir)
    tmp.mkdir()
    try:
        yield tmp
        for root, _, names in os.walk(tmp):  # on disk before the rename makes the directory visible
            for name in names:
                _fsync_file(Path(root) / name)
        check_output_directory(out_dir)  # something may have appeared there meanwhile
        os.replace(tmp, out_dir)  # POSIX rename replaces an empty directory, refuses a non-empty one
    finally:
        if tmp.exists():
            _remove(tmp)
    _sync_directory(out_dir.parent)

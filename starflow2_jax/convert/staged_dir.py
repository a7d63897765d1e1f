"""Exports that appear complete or not at all: write into a directory beside the target, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


def check_export_target(out_dir: os.PathLike | str) -> Path:
    """``out_dir`` as a Path; FileExistsError unless it is absent or an empty directory."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"export target {out_dir} exists and is not an empty directory")
    return out_dir


@contextlib.contextmanager
def staged_directory(out_dir: os.PathLike | str) -> Iterator[Path]:
    """Yields a fresh hidden directory beside ``out_dir`` to write into. On a normal exit its files are
    fsynced and it is renamed to ``out_dir`` (which must be absent or empty); on an exception it is
    removed and ``out_dir`` is left untouched."""
    out_dir = check_export_target(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for path in tmp.iterdir():  # on disk before the rename makes the directory visible
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)

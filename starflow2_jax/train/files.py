"""Output files written atomically (a temporary file beside the target, then a rename), so a reader —
or a crash — never leaves a half-written JSON summary or ``.npz`` behind."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np


def _tmp_path(path: str) -> str:
    return f"{path}.tmp{os.getpid()}"


def write_json(path: os.PathLike | str, obj: Any, indent: int = 2) -> str:
    """Writes ``obj`` as JSON to ``path`` (parent folders created; NaN/inf refused); returns the path."""
    path = os.fspath(path)
    text = json.dumps(obj, indent=indent, allow_nan=False)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_npz(path: os.PathLike | str, arrays: Mapping[str, Any]) -> str:
    """Writes ``arrays`` to the ``.npz`` file ``path`` (uncompressed ``np.savez``); returns the path."""
    path = os.fspath(path)
    if not path.endswith(".npz"):
        raise ValueError(f"write_npz: {path!r} must end in .npz")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path

"""Lazy, tensor-by-tensor reading of one ``.safetensors`` file.

The format is an 8-byte little-endian header length, a JSON header (name → dtype, shape, byte
range) and the raw data. The data is memory-mapped, so a tensor is read from disk only when asked
for and a reader holds at most the tensor being converted. safetensors' own numpy backend
(``safe_open(framework="numpy")``) rejects bfloat16 — the dtype of the official Qwen checkpoints —
so the bytes are viewed with ``ml_dtypes`` dtypes here instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _checked_entry(path: Path, name: str, info, data_size: int) -> dict:
    """``info`` (a header entry) after checking its fields and its byte range against the data size.

    The data of every tensor must lie inside the file and hold exactly ``prod(shape) * itemsize``
    bytes; anything else (a truncated download, an edited header) is a ValueError naming the file and
    the tensor, raised when the file is opened, before any tensor is read.
    """
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise ValueError(f"{where}: header entry {json.dumps(info)[:120]}; expected "
                         "{\"dtype\": ..., \"shape\": [...], \"data_offsets\": [start, end]}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(info["dtype"], str):
        raise ValueError(f"{where}: dtype {info['dtype']!r}; expected a dtype tag such as 'F32' or 'BF16'")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ValueError(f"{where}: shape {shape!r}; expected a list of non-negative ints")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"{where}: data_offsets {offsets!r}; expected [start, end] with 0 <= start <= end")
    start, end = offsets
    if end > data_size:
        raise ValueError(f"{where}: its bytes [{start}, {end}) of the data section run past its end ({data_size} "
                         f"bytes; the file is {path.stat().st_size} bytes): the file is truncated or its header "
                         "is corrupt")
    dtype = DTYPES.get(info["dtype"])
    if dtype is not None:
        need = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if end - start != need:
            raise ValueError(f"{where}: holds {end - start} bytes, but shape {tuple(shape)} of {info['dtype']} needs "
                             f"{need}: the header is corrupt")
    return info


class SafetensorsFile:
    """The header of a safetensors file, read eagerly; its tensors, read on demand.

    ``names`` (header order), ``shape(name)``, ``dtype(name)`` (the safetensors tag, e.g. 'BF16'),
    ``metadata`` (the ``__metadata__`` dict) and ``read(name)`` → a numpy array in the stored dtype
    (bfloat16 as ``ml_dtypes.bfloat16``), a private copy that outlives the file. Opening checks
    every tensor's byte range against the file size and its shape and dtype (ValueError naming the
    file and the tensor), so a truncated or corrupt file fails before anything is converted.
    """

    def __init__(self, path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            header_len = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            if not 0 < header_len <= size - 8:
                raise ValueError(f"{self.path}: not a safetensors file (header length {header_len}, file size {size})")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{self.path}: not a safetensors file (unreadable JSON header: {e})") from e
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: not a safetensors file (the JSON header is a {type(header).__name__}, "
                             "expected an object {name: {dtype, shape, data_offsets}})")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._header = {name: _checked_entry(self.path, name, info, size - self._data_start)
                        for name, info in header.items()}
        self._data = None

    @property
    def names(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._header[name]["shape"])

    def dtype(self, name: str) -> str:
        return self._header[name]["dtype"]

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` as numpy (KeyError if absent, ValueError for an unknown dtype tag)."""
        info = self._header[name]
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']} "
                             f"(supported: {sorted(DTYPES)})")
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start)
        start, end = info["data_offsets"]
        return np.array(self._data[start:end]).view(dtype).reshape(self.shape(name))

    def close(self) -> None:
        """Drops the memory map (reading again reopens it)."""
        self._data = None


def match_checkpoint_keys(model_dir, files: list[SafetensorsFile], expected: dict[str, tuple[int, ...]],
                          key_of: Callable[[str], str | None], what: str) -> dict[str, tuple[SafetensorsFile, str]]:
    """Checks a checkpoint's tensors against the keys and shapes its config implies, before any tensor
    is read. ``expected``: key → shape; ``key_of(stored name)`` → key, or None for a tensor to skip.
    Returns key → (file, stored name); raises ValueError listing every missing, unexpected, mis-shaped
    and duplicated tensor together (``what`` describes the config in the message)."""
    found: dict[str, tuple[SafetensorsFile, str]] = {}
    duplicates, unexpected, wrong_shape = [], [], []
    for file in files:
        for name in file.names:
            key = key_of(name)
            if key is None:
                continue
            if key in found:
                duplicates.append(f"{name} ({found[key][0].path.name} and {file.path.name})")
            elif key not in expected:
                unexpected.append(name)
            elif file.shape(name) != expected[key]:
                wrong_shape.append(f"{name}: {file.shape(name)} != {expected[key]}")
            found[key] = (file, name)
    missing = [k for k in expected if k not in found]
    if missing or unexpected or wrong_shape or duplicates:
        parts = [f"{len(v)} {kind}: {v}" for kind, v in (("missing", missing), ("unexpected", unexpected),
                                                         ("with the wrong shape", wrong_shape),
                                                         ("duplicated", duplicates)) if v]
        raise ValueError(f"checkpoint {model_dir} does not match its config.json ({what}): " + "; ".join(parts))
    return found

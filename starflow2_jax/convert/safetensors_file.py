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

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """The header of a safetensors file, read eagerly; its tensors, read on demand.

    ``names`` (header order), ``shape(name)``, ``dtype(name)`` (the safetensors tag, e.g. 'BF16'),
    ``metadata`` (the ``__metadata__`` dict) and ``read(name)`` → a numpy array in the stored dtype
    (bfloat16 as ``ml_dtypes.bfloat16``), a private copy that outlives the file.
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
        self.metadata = header.pop("__metadata__", None) or {}
        self._header = header
        self._data_start = 8 + header_len
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

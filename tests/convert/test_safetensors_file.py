"""The safetensors reader against files written by the ``safetensors`` library; truncated and corrupt files."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from starflow2_jax.convert.safetensors_file import SafetensorsFile


@pytest.fixture
def tensors():
    rng = np.random.default_rng(0)
    return {"embed": rng.standard_normal((16, 8)).astype(np.float32), "bias": np.arange(8, dtype=np.int64),
            "scale": rng.standard_normal((4, 3)).astype(np.float16)}


@pytest.fixture
def path(tensors, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "np"})
    return path


def _header(path):
    """``(header dict, data bytes)`` parsed independently of the reader."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def _rewrite(path, header, data):
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)


def test_reads_what_safetensors_wrote(path, tensors):
    file = SafetensorsFile(path)
    assert sorted(file.names) == sorted(tensors) and file.metadata == {"format": "np"}
    for name, value in tensors.items():
        read = file.read(name)
        assert read.dtype == value.dtype and np.array_equal(read, value)
    assert file.shape("embed") == (16, 8) and file.dtype("scale") == "F16"


def test_bfloat16_is_read_exactly(tmp_path):
    values = np.linspace(-2, 2, 12, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(3, 4)
    header = {"w": {"dtype": "BF16", "shape": [3, 4], "data_offsets": [0, 24]}}
    _rewrite(tmp_path / "bf16.safetensors", header, values.tobytes())
    assert np.array_equal(SafetensorsFile(tmp_path / "bf16.safetensors").read("w"), values)


def test_truncated_file_names_file_and_tensor(path):
    header, data = _header(path)
    last = max((name for name in header if name != "__metadata__"), key=lambda name: header[name]["data_offsets"][1])
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])
    with pytest.raises(ValueError, match=rf"{path}: tensor '{last}': its bytes \[\d+, {len(data)}\) of the data "
                                         rf"section run past its end \({len(data) - 10} bytes.*truncated"):
        SafetensorsFile(path)


@pytest.mark.parametrize("edit, match", [
    (lambda h: h["embed"].update(shape=[16, 9]), r"tensor 'embed': holds 512 bytes, but shape \(16, 9\) of F32 "
                                                 r"needs 576: the header is corrupt"),
    (lambda h: h["bias"].update(data_offsets=[0, 10**6]), r"tensor 'bias': its bytes \[0, 1000000\) .* run past"),
    (lambda h: h["bias"].update(data_offsets=[64, 0]), r"tensor 'bias': data_offsets \[64, 0\]; expected"),
    (lambda h: h["bias"].update(shape=[-8]), r"tensor 'bias': shape \[-8\]; expected a list of non-negative"),
    (lambda h: h["bias"].pop("data_offsets"), r"tensor 'bias': header entry .*; expected \{\"dtype\""),
    (lambda h: h["bias"].update(dtype=["I64"]), r"tensor 'bias': dtype \['I64'\]; expected a dtype tag"),
])
def test_corrupt_header_names_file_and_tensor(path, edit, match):
    header, data = _header(path)
    edit(header)
    _rewrite(path, header, data)
    with pytest.raises(ValueError, match=rf"{path}: {match}"):
        SafetensorsFile(path)


def test_not_a_safetensors_file(path, tmp_path):
    _, data = _header(path)
    _rewrite(path, [1, 2], data)
    with pytest.raises(ValueError, match=r"not a safetensors file \(the JSON header is a list"):
        SafetensorsFile(path)
    (tmp_path / "short.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(ValueError, match=r"short\.safetensors: not a safetensors file \(header length -1"):
        SafetensorsFile(tmp_path / "short.safetensors")

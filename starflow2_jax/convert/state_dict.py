"""Reading and writing flat PyTorch-style state dicts (``name -> array``) as numpy, without needing torch.

Supported files: ``.npz`` (numpy), ``.safetensors`` and ``.pt`` / ``.pth`` (``torch.load``; torch is
imported only for these). Writes go through ``starflow2_jax.atomic``: an interrupted or failed save
leaves neither a half-written checkpoint nor a temporary file behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np

from starflow2_jax.atomic import output_path

SUPPORTED_SUFFIXES = (".npz", ".safetensors", ".pt", ".pth")
FIXTURE_PREFIX = "sd/"  # our reference fixtures store the state dict next to other arrays as sd/<name>
_ORDER_METADATA = "starflow2_jax.key_order"  # safetensors sorts its header; the order travels here



def load_state_dict(source, prefix: str | None = None) -> dict[str, np.ndarray]:
    """Returns the state dict in ``source`` as an ordered ``{name: np.ndarray}``.

    ``source`` is a mapping (values: numpy arrays, torch tensors or anything ``np.asarray`` takes) or
    a path to a ``.npz``, ``.safetensors``, ``.pt`` or ``.pth`` file. A ``.pt``/``.pth`` file may hold
    the state dict itself or a dict with a ``'model'`` or ``'state_dict'`` entry; it is read with
    ``torch.load(weights_only=True, map_location='cpu')``.

    ``prefix``: keep only the keys starting with it and strip it. By default, if any key starts with
    ``'sd/'`` (our reference fixtures), only those are kept, stripped; otherwise every key is kept.

    bfloat16 tensors (torch or safetensors) are returned as float32 (exact: every bf16 value is a
    float32 value); all other dtypes are kept.
    """
    if isinstance(source, Mapping):
        items = list(source.items())
    else:
        path = Path(source)
        suffix = path.suffix.lower()
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                items = [(k, data[k]) for k in data.files]
        elif suffix == ".safetensors":
            items = _read_safetensors(path)
        elif suffix in (".pt", ".pth"):
            items = list(_read_torch(path).items())
        else:
            raise ValueError(f"{path}: unsupported state dict file type {suffix!r}; "
                             f"supported: {', '.join(SUPPORTED_SUFFIXES)}")
    if prefix is None:
        prefix = FIXTURE_PREFIX if any(str(k).startswith(FIXTURE_PREFIX) for k, _ in items) else ""
    return {str(k)[len(prefix):]: _to_numpy(k, v) for k, v in items if str(k).startswith(prefix)}


def save_state_dict(state_dict: Mapping[str, np.ndarray], path) -> Path:
    """Writes ``state_dict`` to ``path`` (``.npz``, ``.safetensors``, ``.pt``/``.pth``) atomically.

    The key order is preserved on reload (safetensors stores it in its metadata). ``.pt`` files hold
    a plain ``{name: torch.Tensor}`` dict that ``torch.load(weights_only=True)`` reads. Returns the path.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(f"{path}: unsupported state dict file type {suffix!r}; "
                         f"supported: {', '.join(SUPPORTED_SUFFIXES)}")
    arrays = {str(k): np.ascontiguousarray(_to_numpy(k, v)) for k, v in state_dict.items()}
    with output_path(path) as tmp:  # tmp keeps the suffix: np.savez appends '.npz' to names without it
        if suffix == ".npz":
            np.savez(tmp, **arrays)
        elif suffix == ".safetensors":
            from safetensors.numpy import save_file
            save_file(arrays, str(tmp), metadata={_ORDER_METADATA: json.dumps(list(arrays))})
        else:
            import torch
            torch.save({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, tmp)  # writable copies
    return path


def _to_numpy(name, value) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "dtype"):  # a torch tensor (torch imported by its owner)
        import torch
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.numpy()
    try:
        return np.asarray(value)
    except Exception as e:  # noqa: BLE001 - re-raised with the key name
        raise ValueError(f"state dict entry {name!r} is not an array ({type(value).__name__})") from e


def _read_torch(path: Path) -> dict:
    import torch
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (or a dict with 'model'/'state_dict'), "
                         f"got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: entries that are not tensors: {', '.join(map(str, bad))}")
    return obj


def _read_safetensors(path: Path) -> list[tuple[str, np.ndarray]]:
    """Reads every tensor of a safetensors file in the writer's key order (the header order, or our
    metadata entry); bfloat16 is widened to float32 (exact), other dtypes are kept."""
    from starflow2_jax.convert.safetensors_file import SafetensorsFile
    file = SafetensorsFile(path)
    names = file.names
    order = file.metadata.get(_ORDER_METADATA)
    if order and sorted(json.loads(order)) == sorted(names):
        names = json.loads(order)
    items = []
    for name in names:
        array = file.read(name)
        items.append((name, array.astype(np.float32) if file.dtype(name) == "BF16" else array))
    return items

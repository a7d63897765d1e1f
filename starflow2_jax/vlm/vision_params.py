"""transformers' Qwen2.5-VL vision tower state dict ↔ our ``VisionTower`` params tree.

Keys are relative to a prefix: ``visual.`` in checkpoints (hub layout), ``model.visual.`` in a live
``Qwen2_5_VLForConditionalGeneration`` (transformers 5 in-memory layout), ``''`` for a bare
``Qwen2_5_VisionTransformerPretrainedModel``. Our tree (float32)::

    patch_embed/kernel          (C·tp·p·p, D)       ← patch_embed.proj.weight (D, C, tp, p, p)
    layers/attn_norm/scale      (L, D)              ← blocks.N.norm1.weight
    layers/attn/{query,key,value}/kernel (L, D, H, hd), …/bias (L, H, hd)  ← blocks.N.attn.qkv.{weight,bias}
    layers/attn/out/kernel      (L, H, hd, D), out/bias (L, D)             ← blocks.N.attn.proj.{weight,bias}
    layers/mlp_norm/scale       (L, D)              ← blocks.N.norm2.weight
    layers/mlp/{gate,up,wo}/kernel (L, D, I | I, D), …/bias               ← blocks.N.mlp.{gate,up,down}_proj
    merger/norm/scale           (D,)                ← merger.ln_q.weight
    merger/mlp_in/kernel        (m²D, m²D), bias    ← merger.mlp.0.{weight,bias}
    merger/mlp_out/kernel       (m²D, out), bias    ← merger.mlp.2.{weight,bias}
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from starflow2_jax.vlm.config import QwenVisionConfig

PREFIXES = ("visual.", "model.visual.")  # hub checkpoint layout, transformers 5 in-memory layout

# Per-layer entries: torch suffix under ``blocks.N.`` → our path under ``layers/`` (before slicing N).
_LAYER_LINEARS = {"mlp.gate_proj": "mlp/gate", "mlp.up_proj": "mlp/up", "mlp.down_proj": "mlp/wo"}
_LAYER_VECTORS = {"norm1.weight": "attn_norm/scale", "norm2.weight": "mlp_norm/scale",
                  "attn.proj.bias": "attn/out/bias"}
_MERGER = {"merger.ln_q.weight": "merger/norm/scale", "merger.mlp.0.bias": "merger/mlp_in/bias",
           "merger.mlp.2.bias": "merger/mlp_out/bias"}


def torch_shapes(config: QwenVisionConfig) -> dict[str, tuple[int, ...]]:
    """Every key (without prefix) of the tower's torch state dict and its shape."""
    d, i, c = config.hidden_size, config.intermediate_size, config.in_channels
    p, tp, wide = config.patch_size, config.temporal_patch_size, config.hidden_size * config.spatial_merge_size ** 2
    shapes = {"patch_embed.proj.weight": (d, c, tp, p, p)}
    for n in range(config.depth):
        b = f"blocks.{n}."
        shapes.update({b + "norm1.weight": (d,), b + "norm2.weight": (d,), b + "attn.qkv.weight": (3 * d, d),
                       b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                       b + "mlp.gate_proj.weight": (i, d), b + "mlp.gate_proj.bias": (i,),
                       b + "mlp.up_proj.weight": (i, d), b + "mlp.up_proj.bias": (i,),
                       b + "mlp.down_proj.weight": (d, i), b + "mlp.down_proj.bias": (d,)})
    shapes.update({"merger.ln_q.weight": (d,), "merger.mlp.0.weight": (wide, wide), "merger.mlp.0.bias": (wide,),
                   "merger.mlp.2.weight": (config.out_hidden_size, wide),
                   "merger.mlp.2.bias": (config.out_hidden_size,)})
    return shapes


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; bfloat16 has no numpy dtype, widen it (exact)
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value, np.float32)


def _detect_prefix(keys) -> str:
    for prefix in sorted(PREFIXES, key=len, reverse=True):
        if any(k.startswith(prefix + "patch_embed.") for k in keys):
            return prefix
    if any(k.startswith("patch_embed.") for k in keys):
        return ""
    raise ValueError(f"no vision tower found in the state dict: expected keys like 'visual.patch_embed.proj.weight' "
                     f"or 'model.visual.patch_embed.proj.weight' ({len(keys)} keys, e.g. {sorted(keys)[:3]})")


def vision_params_from_torch(state_dict: Mapping, config: QwenVisionConfig, prefix: str | None = None) -> dict:
    """Our params tree (float32 numpy) from transformers' vision tower weights in ``state_dict``.

    ``prefix``: the key prefix of the tower (None: detect ``model.visual.``, ``visual.`` or none).
    Values may be torch tensors (any float dtype) or arrays. Raises ValueError listing missing keys,
    unexpected ``{prefix}*`` keys (e.g. a deeper tower than ``config.depth``) and shape mismatches.
    """
    keys = [str(k) for k in state_dict]
    prefix = _detect_prefix(keys) if prefix is None else prefix
    expected = torch_shapes(config)
    present = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    if prefix == "":  # a bare tower: ignore anything that is not a tower key (e.g. a whole model)
        present = {k: k for k in present if k.split(".")[0] in ("patch_embed", "blocks", "merger")}
    missing = [prefix + k for k in expected if k not in present]
    unexpected = [present[k] for k in present if k not in expected]
    if missing or unexpected:
        raise ValueError(f"vision state dict (prefix {prefix!r}, config depth={config.depth}) does not match: "
                         f"missing {missing[:12]}{' …' if len(missing) > 12 else ''} ({len(missing)}), "
                         f"unexpected {unexpected[:12]}{' …' if len(unexpected) > 12 else ''} ({len(unexpected)})")
    sd = {}
    for k, shape in expected.items():
        value = _to_numpy(state_dict[present[k]])
        if value.shape != shape:
            raise ValueError(f"{present[k]}: shape {value.shape}, expected {shape} for the vision config")
        sd[k] = value
    return _params_from(sd, config)


_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def vision_tensor_from_torch(name: str, value: np.ndarray,
                             config: QwenVisionConfig) -> list[tuple[str, int | None, np.ndarray]]:
    """One tower tensor (torch layout, key ``name`` without prefix, e.g. 'blocks.3.attn.qkv.weight') in ours.

    Returns ``[(path, layer, value)]``: our path ('layers/attn/query/kernel'), the layer index of a
    stacked parameter (None otherwise) and the value in our layout (any dtype is kept); the fused qkv
    tensors give three entries. Raises KeyError for a name the tower does not have.
    """
    d, h, hd = config.hidden_size, config.num_heads, config.head_dim
    if name == "patch_embed.proj.weight":
        return [("patch_embed/kernel", None, value.reshape(d, -1).T)]
    if name in _MERGER:
        return [(_MERGER[name], None, value)]
    if name in ("merger.mlp.0.weight", "merger.mlp.2.weight"):
        return [("merger/mlp_in/kernel" if ".0." in name else "merger/mlp_out/kernel", None, value.T)]
    match = _BLOCK.fullmatch(name)
    if match is None:
        raise KeyError(f"unexpected vision tower parameter {name!r}")
    n, suffix = int(match.group(1)), match.group(2)
    if suffix in _LAYER_VECTORS:
        return [("layers/" + _LAYER_VECTORS[suffix], n, value)]
    # qkv rows: [q | k | v], each head-major (row h·hd + j) — transformers reshapes to (3, H, hd).
    if suffix == "attn.qkv.weight":
        return [(f"layers/attn/{part}/kernel", n, w.T.reshape(d, h, hd))
                for part, w in zip(("query", "key", "value"), np.split(value, 3))]
    if suffix == "attn.qkv.bias":
        return [(f"layers/attn/{part}/bias", n, b.reshape(h, hd))
                for part, b in zip(("query", "key", "value"), np.split(value, 3))]
    if suffix == "attn.proj.weight":
        return [("layers/attn/out/kernel", n, value.T.reshape(h, hd, d))]
    linear, _, kind = suffix.rpartition(".")
    if linear in _LAYER_LINEARS and kind in ("weight", "bias"):
        return [(f"layers/{_LAYER_LINEARS[linear]}/{'kernel' if kind == 'weight' else 'bias'}", n,
                 value.T if kind == "weight" else value)]
    raise KeyError(f"unexpected vision tower parameter {name!r}")


def vision_tensor_to_torch(name: str, params, config: QwenVisionConfig) -> np.ndarray:
    """The torch tensor ``name`` (key without prefix) from our params tree, in the params' dtype;
    inverse of ``vision_tensor_from_torch``. Raises KeyError for a name the tower does not have."""
    d, c, tp, p = config.hidden_size, config.in_channels, config.temporal_patch_size, config.patch_size
    get = lambda path: np.asarray(_get(params, path))  # noqa: E731
    if name == "patch_embed.proj.weight":
        return get("patch_embed/kernel").T.reshape(d, c, tp, p, p)
    if name in _MERGER:
        return get(_MERGER[name])
    if name in ("merger.mlp.0.weight", "merger.mlp.2.weight"):
        return get("merger/mlp_in/kernel" if ".0." in name else "merger/mlp_out/kernel").T
    match = _BLOCK.fullmatch(name)
    if match is None:
        raise KeyError(f"unexpected vision tower parameter {name!r}")
    n, suffix = int(match.group(1)), match.group(2)
    layer = lambda path: np.asarray(_get(params, "layers/" + path)[n])  # noqa: E731  (one layer's slice only)
    if suffix in _LAYER_VECTORS:
        return layer(_LAYER_VECTORS[suffix])
    if suffix == "attn.qkv.weight":
        return np.concatenate([layer(f"attn/{x}/kernel").reshape(d, -1).T for x in ("query", "key", "value")])
    if suffix == "attn.qkv.bias":
        return np.concatenate([layer(f"attn/{x}/bias").reshape(-1) for x in ("query", "key", "value")])
    if suffix == "attn.proj.weight":
        return layer("attn/out/kernel").reshape(-1, d).T
    linear, _, kind = suffix.rpartition(".")
    if linear in _LAYER_LINEARS and kind in ("weight", "bias"):
        value = layer(f"{_LAYER_LINEARS[linear]}/{'kernel' if kind == 'weight' else 'bias'}")
        return value.T if kind == "weight" else value
    raise KeyError(f"unexpected vision tower parameter {name!r}")


def _params_from(sd: Mapping[str, np.ndarray], config: QwenVisionConfig) -> dict:
    stacked: dict[str, list] = {}
    tree: dict = {}
    for name in torch_shapes(config):
        for path, layer, value in vision_tensor_from_torch(name, sd[name], config):
            if layer is None:
                _set(tree, path, np.ascontiguousarray(value))
            else:
                stacked.setdefault(path, [None] * config.depth)[layer] = value
    for path, values in stacked.items():
        _set(tree, path, np.stack(values))
    return tree


def vision_params_to_torch(params, config: QwenVisionConfig, prefix: str = "visual.") -> dict[str, np.ndarray]:
    """transformers' state dict (float32 numpy, keys ``{prefix}…``) of our params tree; inverse of
    ``vision_params_from_torch``."""
    return {prefix + k: np.ascontiguousarray(vision_tensor_to_torch(k, params, config), np.float32)
            for k in torch_shapes(config)}


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def _get(tree, path: str):
    for name in path.split("/"):
        tree = tree[name]
    return tree

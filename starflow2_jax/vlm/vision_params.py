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


def _params_from(sd: Mapping[str, np.ndarray], config: QwenVisionConfig) -> dict:
    d, h, hd = config.hidden_size, config.num_heads, config.head_dim
    layers: dict[str, list] = {}

    def put(path: str, value: np.ndarray):
        layers.setdefault(path, []).append(value)

    for n in range(config.depth):
        b = f"blocks.{n}."
        for suffix, path in _LAYER_VECTORS.items():
            put(path, sd[b + suffix])
        # qkv rows: [q | k | v], each head-major (row h·hd + j) — transformers reshapes to (3, H, hd).
        for part, w, bias in zip(("query", "key", "value"), np.split(sd[b + "attn.qkv.weight"], 3),
                                 np.split(sd[b + "attn.qkv.bias"], 3)):
            put(f"attn/{part}/kernel", w.T.reshape(d, h, hd))
            put(f"attn/{part}/bias", bias.reshape(h, hd))
        put("attn/out/kernel", sd[b + "attn.proj.weight"].T.reshape(h, hd, d))
        for torch_name, path in _LAYER_LINEARS.items():
            put(path + "/kernel", sd[f"{b}{torch_name}.weight"].T)
            put(path + "/bias", sd[f"{b}{torch_name}.bias"])
    tree: dict = {"patch_embed": {"kernel": sd["patch_embed.proj.weight"].reshape(d, -1).T.copy()}}
    for path, values in layers.items():
        _set(tree, "layers/" + path, np.stack(values))
    for torch_name, path in _MERGER.items():
        _set(tree, path, sd[torch_name])
    _set(tree, "merger/mlp_in/kernel", sd["merger.mlp.0.weight"].T.copy())
    _set(tree, "merger/mlp_out/kernel", sd["merger.mlp.2.weight"].T.copy())
    return tree


def vision_params_to_torch(params, config: QwenVisionConfig, prefix: str = "visual.") -> dict[str, np.ndarray]:
    """transformers' state dict (float32 numpy, keys ``{prefix}…``) of our params tree; inverse of
    ``vision_params_from_torch``."""
    d, c, tp, p = config.hidden_size, config.in_channels, config.temporal_patch_size, config.patch_size
    get = lambda path: np.asarray(_get(params, path), np.float32)  # noqa: E731
    sd = {"patch_embed.proj.weight": get("patch_embed/kernel").T.reshape(d, c, tp, p, p)}
    for n in range(config.depth):
        b = f"blocks.{n}."
        layer = lambda path: get("layers/" + path)[n]  # noqa: E731
        sd[b + "norm1.weight"] = layer("attn_norm/scale")
        sd[b + "norm2.weight"] = layer("mlp_norm/scale")
        sd[b + "attn.qkv.weight"] = np.concatenate(
            [layer(f"attn/{x}/kernel").reshape(d, -1).T for x in ("query", "key", "value")])
        sd[b + "attn.qkv.bias"] = np.concatenate(
            [layer(f"attn/{x}/bias").reshape(-1) for x in ("query", "key", "value")])
        sd[b + "attn.proj.weight"] = layer("attn/out/kernel").reshape(-1, d).T
        sd[b + "attn.proj.bias"] = layer("attn/out/bias")
        for torch_name, path in _LAYER_LINEARS.items():
            sd[f"{b}{torch_name}.weight"] = layer(path + "/kernel").T
            sd[f"{b}{torch_name}.bias"] = layer(path + "/bias")
    for torch_name, path in _MERGER.items():
        sd[torch_name] = get(path)
    sd["merger.mlp.0.weight"] = get("merger/mlp_in/kernel").T
    sd["merger.mlp.2.weight"] = get("merger/mlp_out/kernel").T
    shapes = torch_shapes(config)
    return {prefix + k: np.ascontiguousarray(sd[k]) for k in shapes}


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def _get(tree, path: str):
    for name in path.split("/"):
        tree = tree[name]
    return tree

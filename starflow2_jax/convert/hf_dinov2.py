"""Hugging Face DINOv2 checkpoints (``config.json`` + safetensors) ↔ our ``Dinov2Config`` and params.

    config, params = convert.load_hf_dinov2("dinov2-with-registers-base", mesh=mesh, expect=fae_config.encoder)
    convert.export_hf_dinov2(config, params, "out_dir")

Key layout: what ``Dinov2Model.save_pretrained`` and the official ``facebook/dinov2*`` checkpoints hold
(transformers 5 renames the attention / SwiGLU keys in memory and back on save)::

    embeddings.{cls_token, mask_token, position_embeddings, register_tokens, patch_embeddings.projection.*}
    encoder.layer.N.{norm1, norm2}.*, .attention.attention.{query, key, value}.*, .attention.output.dense.*,
    .layer_scale{1,2}.lambda1, .mlp.{fc1, fc2}.* (GELU) or .mlp.{weights_in, weights_out}.* (SwiGLU:
    weights_in is [gate; up] stacked on the output axis), layernorm.*

``Dinov2ForImageClassification`` checkpoints prefix these with the base model prefix (``dinov2.`` /
``dinov2_with_registers.``) and add ``classifier.*``; both are accepted, the head is skipped. The
``mask_token`` (the masked-image-modelling token, never used at inference) is accepted and skipped;
export writes zeros for it where transformers requires it (the registers variant).

Import streams as ``hf_qwen`` does: every key is checked against the config first (missing,
unexpected and mis-shaped keys reported together, before any tensor is read), then tensors are read
one at a time and placed on their devices layer by layer (``placement.ParamSink``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from starflow2_jax.atomic import check_output_directory, output_directory
from starflow2_jax.convert.hf_qwen import CONFIG_FILE, SINGLE_FILE, checkpoint_shards
from starflow2_jax.convert.placement import ParamSink
from starflow2_jax.convert.safetensors_file import SafetensorsFile, match_checkpoint_keys
from starflow2_jax.fae.dinov2 import Dinov2Config, init_dinov2_boxed

DTYPES = ("float32", "bfloat16")
MASK_TOKEN = "embeddings.mask_token"
HEAD_PREFIX = "classifier."
BASE_PREFIXES = {"dinov2": "dinov2.", "dinov2_with_registers": "dinov2_with_registers."}
# what ``expect`` may name: the fields that decide the architecture (not dtype, remat, preprocessing)
EXPECT_FIELDS = ("variant", "hidden_size", "num_layers", "num_heads", "mlp_ratio", "patch_size", "image_size",
                 "num_channels", "num_register_tokens", "use_swiglu_ffn", "layer_norm_eps", "qkv_bias", "hidden_act")


# ---- the key table ------------------------------------------------------------------------------
def _tables(config: Dinov2Config):
    """(top, layer): hub key (layer suffix) → (torch shape, [our paths], to_ours(v) → [arrays],
    to_torch([arrays]) → v)."""
    d, h, hd, f, p, c = (config.hidden_size, config.num_heads, config.head_dim, config.mlp_hidden,
                         config.patch_size, config.num_channels)
    same = (lambda v: [v], lambda vs: vs[0])
    lin = (lambda v: [v.T], lambda vs: vs[0].T)  # torch Linear (out, in) ↔ kernel (in, out)
    qkv_w = (lambda v: [v.T.reshape(d, h, hd)], lambda vs: vs[0].reshape(d, h * hd).T)
    qkv_b = (lambda v: [v.reshape(h, hd)], lambda vs: vs[0].reshape(h * hd))
    out_w = (lambda v: [v.T.reshape(h, hd, d)], lambda vs: vs[0].reshape(h * hd, d).T)
    fused_w = (lambda v: [v[:f].T, v[f:].T], lambda vs: np.concatenate([vs[0].T, vs[1].T], axis=0))
    fused_b = (lambda v: [v[:f], v[f:]], lambda vs: np.concatenate(vs, axis=0))
    patch_w = (lambda v: [v.transpose(2, 3, 1, 0).reshape(p * p * c, d)],  # (D, C, p, p) → (p·p·C, D)
               lambda vs: vs[0].reshape(p, p, c, d).transpose(3, 2, 0, 1))
    top = {"embeddings.cls_token": ((1, 1, d), [("cls_token",)], lambda v: [v.reshape(d)],
                                    lambda vs: vs[0].reshape(1, 1, d)),
           "embeddings.position_embeddings": ((1, config.native_grid ** 2 + 1, d), [("position_embeddings",)],
                                              lambda v: [v[0]], lambda vs: vs[0][None]),
           "embeddings.patch_embeddings.projection.weight": ((d, c, p, p), [("patch_embed", "kernel")], *patch_w),
           "embeddings.patch_embeddings.projection.bias": ((d,), [("patch_embed", "bias")], *same)}
    if config.num_register_tokens:
        top["embeddings.register_tokens"] = ((1, config.num_register_tokens, d), [("register_tokens",)],
                                             lambda v: [v[0]], lambda vs: vs[0][None])
    layer = {}
    for norm in ("norm1", "norm2"):
        layer[f"{norm}.weight"] = ((d,), [(norm, "scale")], *same)
        layer[f"{norm}.bias"] = ((d,), [(norm, "bias")], *same)
    for ours, theirs in (("query", "query"), ("key", "key"), ("value", "value")):
        layer[f"attention.attention.{theirs}.weight"] = ((d, d), [("attn", ours, "kernel")], *qkv_w)
        if config.qkv_bias:
            layer[f"attention.attention.{theirs}.bias"] = ((d,), [("attn", ours, "bias")], *qkv_b)
    layer["attention.output.dense.weight"] = ((d, d), [("attn", "out", "kernel")], *out_w)
    layer["attention.output.dense.bias"] = ((d,), [("attn", "out", "bias")], *same)
    layer["layer_scale1.lambda1"] = ((d,), [("layer_scale1",)], *same)
    layer["layer_scale2.lambda1"] = ((d,), [("layer_scale2",)], *same)
    if config.use_swiglu_ffn:
        layer["mlp.weights_in.weight"] = ((2 * f, d), [("mlp", "gate", "kernel"), ("mlp", "up", "kernel")], *fused_w)
        layer["mlp.weights_in.bias"] = ((2 * f,), [("mlp", "gate", "bias"), ("mlp", "up", "bias")], *fused_b)
        layer["mlp.weights_out.weight"] = ((d, f), [("mlp", "wo", "kernel")], *lin)
        layer["mlp.weights_out.bias"] = ((d,), [("mlp", "wo", "bias")], *same)
    else:
        layer["mlp.fc1.weight"] = ((f, d), [("mlp", "wi", "kernel")], *lin)
        layer["mlp.fc1.bias"] = ((f,), [("mlp", "wi", "bias")], *same)
        layer["mlp.fc2.weight"] = ((d, f), [("mlp", "wo", "kernel")], *lin)
        layer["mlp.fc2.bias"] = ((d,), [("mlp", "wo", "bias")], *same)
    final = {"layernorm.weight": ((d,), [("final_norm", "scale")], *same),
             "layernorm.bias": ((d,), [("final_norm", "bias")], *same)}
    return top, layer, final


def hub_entries(config: Dinov2Config) -> dict[str, tuple]:
    """Every hub key a checkpoint of ``config`` needs (mask token excluded), in checkpoint order →
    (torch shape, [our paths], to_ours, to_torch, layer index or None)."""
    top, layer, final = _tables(config)
    entries = {key: (*spec, None) for key, spec in top.items()}
    for n in range(config.num_layers):
        entries.update({f"encoder.layer.{n}.{key}": (shape, [("layers",) + path for path in paths], a, b, n)
                        for key, (shape, paths, a, b) in layer.items()})
    entries.update({key: (*spec, None) for key, spec in final.items()})
    return entries


# ---- import -------------------------------------------------------------------------------------
def read_config(model_dir, dtype: str = "float32") -> Dinov2Config:
    """``Dinov2Config`` of ``model_dir/config.json`` (compute dtype ``dtype``); ValueError naming the file."""
    path = Path(model_dir) / CONFIG_FILE
    try:
        return Dinov2Config.from_hf(json.loads(path.read_text()), dtype=dtype)
    except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: {e}") from e


def check_expected(config: Dinov2Config, expect: Dinov2Config | Mapping[str, Any] | None, source) -> None:
    """ValueError naming every field where ``config`` (read from ``source``) differs from ``expect``
    (a Dinov2Config: the architecture fields ``EXPECT_FIELDS``; a dict: the fields it names)."""
    if expect is None:
        return
    if isinstance(expect, Dinov2Config):
        wanted = {name: getattr(expect, name) for name in EXPECT_FIELDS}
    elif isinstance(expect, Mapping):
        unknown = [k for k in expect if k not in EXPECT_FIELDS]
        if unknown:
            raise ValueError(f"expect names unknown field(s) {unknown}; expected some of {EXPECT_FIELDS}")
        wanted = dict(expect)
    else:
        raise ValueError(f"expect={expect!r}: expected None, a Dinov2Config or a dict of its fields")
    diffs = [f"{name}: checkpoint {getattr(config, name)!r}, expected {value!r}"
             for name, value in wanted.items() if getattr(config, name) != value]
    if diffs:
        raise ValueError(f"DINOv2 checkpoint {source} does not match the expected encoder: " + "; ".join(diffs))


def _check_keys(model_dir: Path, files: list[SafetensorsFile], config: Dinov2Config, entries: dict) -> dict:
    """hub key → (file, stored name) for every needed key; ValueError listing every problem together."""
    prefix = BASE_PREFIXES[config.variant]

    def key_of(name: str) -> str | None:
        key = name[len(prefix):] if name.startswith(prefix) else name
        if key == MASK_TOKEN or name.startswith(HEAD_PREFIX):
            return None  # pre-training mask token / classification head: unused by the features
        return key

    return match_checkpoint_keys(model_dir, files, {k: v[0] for k, v in entries.items()}, key_of,
                                 f"{config.variant}, {config.num_layers} layers, hidden {config.hidden_size}")


def param_shardings(config: Dinov2Config, mesh=None, rules=None):
    """``(abstract unboxed params, Sharding per param)``: by the logical names and ``rules`` (default
    ``parallel.FAE_RULES``) on ``mesh``; without a mesh every parameter on the default device."""
    boxed = jax.eval_shape(functools.partial(init_dinov2_boxed, config), jax.random.key(0))
    abstract = nn.meta.unbox(boxed)
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        return abstract, jax.tree_util.tree_map(lambda _: device, abstract)
    from starflow2_jax.parallel import FAE_RULES, logical_shardings
    return abstract, logical_shardings(boxed, mesh, FAE_RULES if rules is None else rules)


def load_hf_dinov2(model_dir, *, dtype: str = "float32", mesh=None, expect=None, rules=None):
    """Reads a Hugging Face DINOv2 (or DINOv2-with-registers) checkpoint. Returns ``(Dinov2Config, params)``.

    dtype: 'float32' or 'bfloat16', the stored parameter dtype and the config's compute dtype.
    mesh / rules: place every parameter directly with its ``NamedSharding`` (default rules
    ``parallel.FAE_RULES``); without a mesh everything goes to the default device.
    expect: None, or a ``Dinov2Config`` / dict of ``EXPECT_FIELDS`` the checkpoint must match (checked
    before any tensor is read). The returned config has remat 'none' and the ImageNet mean/std.
    Raises FileNotFoundError (missing files, listed) and ValueError (another model_type; an ``expect``
    mismatch, every field named; missing, unexpected or mis-shaped keys, listed together).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {DTYPES}")
    model_dir = Path(model_dir)
    shards = checkpoint_shards(model_dir)
    config = read_config(model_dir, dtype)
    check_expected(config, expect, model_dir)
    files = [SafetensorsFile(p) for p in shards]
    entries = hub_entries(config)
    found = _check_keys(model_dir, files, config, entries)
    sink = ParamSink(*param_shardings(config, mesh, rules), jax.numpy.dtype(dtype))
    wanted = {(file.path, name): key for key, (file, name) in found.items()}
    for file in files:  # in each file's order: one shard's pages are touched at a time
        for name in file.names:
            key = wanted.get((file.path, name))
            if key is None:
                continue
            _, paths, to_ours, _, layer = entries[key]
            for path, value in zip(paths, to_ours(file.read(name))):
                sink.put(path, value, layer)
        file.close()
    return config, sink.finish()


# ---- export -------------------------------------------------------------------------------------
def _get(params, path: tuple[str, ...], layer: int | None) -> np.ndarray:
    node = params
    for part in path:
        node = node[part]
    return np.asarray(node if layer is None else node[layer])


def export_hf_dinov2(config: Dinov2Config, params, out_dir) -> Path:
    """Writes ``params`` as ``config.json`` + ``model.safetensors`` (hub layout, the params' dtype) that
    ``Dinov2Model`` / ``Dinov2WithRegistersModel.from_pretrained(out_dir)`` load with no missing or
    unexpected keys. Returns ``out_dir``; it appears complete or not at all (written beside it, then
    renamed) and must not exist or be empty (FileExistsError otherwise)."""
    config.validate()
    out_dir = check_output_directory(out_dir)
    from safetensors.numpy import save_file

    dtype = np.dtype(params["patch_embed"]["kernel"].dtype)
    with output_directory(out_dir) as tmp:
        hf = dict(config.to_hf(), dtype="bfloat16" if dtype == jax.numpy.bfloat16 else str(dtype))
        (tmp / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
        tensors = {}
        for key, (shape, paths, _, to_torch, layer) in hub_entries(config).items():
            tensors[key] = np.ascontiguousarray(to_torch([_get(params, path, layer) for path in paths]), dtype)
            if tensors[key].shape != shape:
                raise ValueError(f"params give {key} the shape {tensors[key].shape}; config expects {shape}")
        if config.num_register_tokens:  # transformers' registers model always has one; its init value
            tensors[MASK_TOKEN] = np.zeros((1, config.hidden_size), dtype)
        save_file(tensors, str(tmp / SINGLE_FILE), metadata={"format": "pt"})
    return out_dir

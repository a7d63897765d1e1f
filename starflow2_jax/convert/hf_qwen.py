"""Hugging Face Qwen2.5-VL checkpoints (``config.json`` + safetensors) ↔ our config and params.

    config, params = convert.load_hf_qwen2_5_vl("Qwen2.5-VL-7B-Instruct", dtype="bfloat16", mesh=mesh)
    convert.export_hf_qwen2_5_vl(config, params, "out_dir", tokenizer_dir="Qwen2.5-VL-7B-Instruct")

Import streams: every checkpoint key is checked against the config first (missing, unexpected and
mis-shaped keys reported together, before any tensor is read), then tensors are read one at a
time, converted and placed on their devices (``placement.ParamSink``), so host memory stays near
one tensor (the memory-mapped shard is paged in by the OS as it is read). Export writes into a
temporary directory beside the target and renames it when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from starflow2_jax.atomic import check_output_directory, output_directory
from starflow2_jax.convert.hf_qwen_layout import LM_HEAD, hub_key, hub_shapes, to_ours, to_torch
from starflow2_jax.convert.placement import ParamSink
from starflow2_jax.convert.safetensors_file import SafetensorsFile, match_checkpoint_keys
from starflow2_jax.vlm.abstract import abstract_params, param_shardings
from starflow2_jax.vlm.config import QwenVLConfig

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# copied by export when a tokenizer_dir is given (whichever of them exist there)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
                   "generation_config.json")
DTYPES = ("float32", "bfloat16")


def checkpoint_shards(model_dir) -> list[Path]:
    """The safetensors files of the checkpoint in ``model_dir``: those the index names, else every
    ``*.safetensors``. Raises FileNotFoundError listing every missing file (config included)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {model_dir} does not exist")
    missing = [] if (model_dir / CONFIG_FILE).is_file() else [CONFIG_FILE]
    if (model_dir / INDEX_FILE).is_file():
        weight_map = json.loads((model_dir / INDEX_FILE).read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{model_dir / INDEX_FILE}: no 'weight_map' (expected {{tensor name: shard file}})")
        shards = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing += [p.name for p in shards if not p.is_file()]
    else:
        shards = sorted(model_dir.glob("*.safetensors"))
        if not shards:
            missing.append(f"{SINGLE_FILE} (or *.safetensors shards with {INDEX_FILE})")
    if missing:
        raise FileNotFoundError(f"checkpoint directory {model_dir} is missing {len(missing)} file(s): {missing}")
    return shards


def read_config(model_dir, dtype: str = "float32") -> QwenVLConfig:
    """``QwenVLConfig`` of ``model_dir/config.json`` (compute dtype ``dtype``); ValueError for another
    architecture (naming it)."""
    path = Path(model_dir) / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    try:
        return QwenVLConfig.from_hf_dict(data, dtype=dtype)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _check_keys(model_dir: Path, files: list[SafetensorsFile], config: QwenVLConfig) -> dict[str, tuple]:
    """hub key → (file, stored key) for every key the model needs; ValueError listing all problems."""
    def key_of(name: str) -> str | None:
        key = hub_key(name)
        # tied: the head is the embedding (transformers ignores the tensor too)
        return None if key == LM_HEAD and config.text.tie_word_embeddings else key

    return match_checkpoint_keys(model_dir, files, hub_shapes(config), key_of,
                                 f"{config.text.num_layers} text layers, {config.vision.depth} vision layers")


def load_hf_qwen2_5_vl(model_dir, dtype: str = "float32", *, mesh=None, rules=None):
    """Reads a Hugging Face Qwen2.5-VL checkpoint directory. Returns ``(QwenVLConfig, params)``.

    model_dir: ``config.json`` plus ``model.safetensors``, or shards listed by
    ``model.safetensors.index.json``, or shards without an index; hub key layout (``model.layers.N…``,
    ``visual.blocks.N…``) or transformers' in-memory one (``model.language_model.…``, ``model.visual.…``).
    dtype: 'float32' or 'bfloat16', both the stored parameter dtype and the config's compute dtype.
    mesh / rules: place every parameter directly with its ``NamedSharding`` (logical axis names →
    ``rules``, default ``parallel.VLM_RULES``); without a mesh everything goes to the default device.
    params: ``{'text': …, 'vision': …}`` of ``jax.Array``s, as ``vlm.forward`` takes them.

    Raises FileNotFoundError (missing files, listed), ValueError (another architecture; missing,
    unexpected or mis-shaped keys, listed together).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {DTYPES}")
    model_dir = Path(model_dir)
    shards = checkpoint_shards(model_dir)
    config = read_config(model_dir, dtype)
    files = [SafetensorsFile(p) for p in shards]
    found = _check_keys(model_dir, files, config)
    sink = ParamSink(nn.meta.unbox(abstract_params(config)), param_shardings(config, mesh, rules),
                     jax.numpy.dtype(dtype))
    wanted = {(file.path, name): key for key, (file, name) in found.items()}
    for file in files:  # file by file, in each file's order: one shard's pages are touched at a time
        for name in file.names:
            key = wanted.get((file.path, name))
            if key is None:
                continue
            for path, layer, value in to_ours(key, file.read(name), config):
                sink.put(path, value, layer)
        file.close()
    return config, sink.finish()


def _shard_plan(shapes: dict[str, tuple], itemsize: int, max_shard_bytes: int) -> list[list[str]]:
    """Keys grouped greedily, in order, into files of at most ``max_shard_bytes`` (a bigger tensor alone)."""
    plan, size = [[]], 0
    for key, shape in shapes.items():
        nbytes = int(np.prod(shape)) * itemsize
        if plan[-1] and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(key)
        size += nbytes
    return plan


def export_hf_qwen2_5_vl(config: QwenVLConfig, params, out_dir, *, max_shard_bytes: int = 5 * 2 ** 30,
                         tokenizer_dir=None) -> Path:
    """Writes ``params`` as a Hugging Face checkpoint that ``transformers.AutoModelForImageTextToText.
    from_pretrained(out_dir)`` loads with no missing or unexpected keys. Returns ``out_dir``.

    Files: ``config.json`` (``config.to_hf_dict()``, dtype = the params' dtype), hub-layout safetensors
    (``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``
    when larger than ``max_shard_bytes``), and the tokenizer / processor files found in
    ``tokenizer_dir``. Tensors are fetched from the devices one at a time; params must be addressable
    from this process. The directory appears complete or not at all (written beside it, then
    renamed); ``out_dir`` must not exist or be empty (FileExistsError otherwise).
    """
    out_dir = check_output_directory(out_dir)
    missing = [part for part in ("text", "vision") if part not in params]
    if missing:
        raise ValueError(f"params lack {missing}: a Hugging Face checkpoint holds the text decoder and the "
                         f"vision tower (params = {{'text': ..., 'vision': ...}})")
    from safetensors.numpy import save_file

    dtype = np.dtype(params["text"]["embed_tokens"].dtype)
    shapes = hub_shapes(config)
    plan = _shard_plan(shapes, dtype.itemsize, max_shard_bytes)
    with output_directory(out_dir) as tmp:
        hf = config.to_hf_dict()
        hf["dtype"] = "bfloat16" if dtype == jax.numpy.bfloat16 else str(dtype)
        (tmp / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
        names = [SINGLE_FILE] if len(plan) == 1 else [
            f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
        for name, keys in zip(names, plan):
            tensors = {k: np.ascontiguousarray(to_torch(k, params, config), dtype) for k in keys}
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            del tensors
        if len(plan) > 1:
            index = {"metadata": {"total_size": sum(int(np.prod(s)) for s in shapes.values()) * dtype.itemsize},
                     "weight_map": {k: name for name, keys in zip(names, plan) for k in keys}}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
    return out_dir

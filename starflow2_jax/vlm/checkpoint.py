"""Orbax checkpoints of a (frozen) Qwen2.5-VL: params plus the config, one directory.

Layout: an Orbax composite checkpoint with two items, ``params`` (``StandardSave`` of the
``{'text': …, 'vision': …}`` tree) and ``config`` (JSON: the Hugging Face config dict, the compute
dtype and a format tag). Orbax writes into a temporary directory and renames it when finalised, so
an interrupted save leaves no checkpoint behind. Restoring reads the config first and restores the
params directly into their shardings (a mesh + rules, or the default device).
"""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax

from starflow2_jax.atomic import check_output_directory
from starflow2_jax.vlm.abstract import abstract_params, param_shardings
from starflow2_jax.vlm.config import QwenVLConfig

FORMAT = "starflow2_jax.vlm.qwen2_5_vl/1"


def _checkpointer():
    import orbax.checkpoint as ocp
    handler = ocp.CompositeCheckpointHandler(params=ocp.StandardCheckpointHandler(),
                                             config=ocp.JsonCheckpointHandler())
    return ocp, ocp.Checkpointer(handler)


def save_checkpoint(path, config: QwenVLConfig, params) -> Path:
    """Writes ``params`` and ``config`` to the new directory ``path`` (absolute or relative); returns
    its absolute path. FileExistsError if ``path`` exists and is not an empty directory."""
    path = check_output_directory(Path(path).absolute())
    if path.exists():
        path.rmdir()  # orbax renames its finished temporary directory onto the path
    ocp, checkpointer = _checkpointer()
    meta = {"format": FORMAT, "hf_config": config.to_hf_dict(), "dtype": config.text.dtype,
            "remat": config.text.remat}
    checkpointer.save(path, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                    config=ocp.args.JsonSave(meta)))
    return path


def load_checkpoint(path, *, mesh=None, rules=None):
    """Reads a ``save_checkpoint`` directory. Returns ``(QwenVLConfig, params)``.

    Params keep their stored dtype and are restored with the shardings of ``vlm.param_shardings``
    (``mesh`` + ``rules``, default ``parallel.VLM_RULES``; without a mesh, the
    default device). Raises FileNotFoundError / ValueError naming what is wrong with ``path``.
    """
    path = Path(path).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    missing = [item for item in ("params", "config") if not (path / item).is_dir()]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} lacks the item(s) {missing} (not a vlm.save_checkpoint directory)")
    ocp, checkpointer = _checkpointer()
    meta = checkpointer.restore(path, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    found = meta.get("format") if isinstance(meta, dict) else meta
    if found != FORMAT:
        raise ValueError(f"checkpoint {path}: config format {found!r}, expected {FORMAT!r}")
    config = QwenVLConfig.from_hf_dict(meta["hf_config"], dtype=meta["dtype"], remat=meta.get("remat", "none"))
    shapes = nn.meta.unbox(abstract_params(config))
    shardings = param_shardings(config, mesh, rules)
    dtypes = _stored_dtypes(checkpointer, path, shapes)
    target = jax.tree_util.tree_map(lambda s, sh, dt: jax.ShapeDtypeStruct(s.shape, dt, sharding=sh),
                                    shapes, shardings, dtypes)
    params = checkpointer.restore(path, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))).params
    return config, params


def _stored_dtypes(checkpointer, path: Path, shapes):
    """The dtype of every stored parameter (restoring keeps it: a bfloat16 checkpoint stays bfloat16)."""
    stored = checkpointer.metadata(path).item_metadata["params"].tree
    try:
        return jax.tree_util.tree_map(lambda _, m: m.dtype, shapes, stored)
    except ValueError as e:  # a different tree: another model's or another config's params
        raise ValueError(f"checkpoint {path}: stored params do not match the config's parameter tree ({e})") from e

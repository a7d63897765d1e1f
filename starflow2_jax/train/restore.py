"""A trained model back from its workdir: the stored config, the task, and the (EMA) parameters.

``restore_workdir(workdir)`` reads the latest *complete* step under ``<workdir>/checkpoints`` (see
``train.checkpoint.complete_steps``), the config JSON stored with it, and only the parameter tree
that is asked for (``ema_params`` when the run kept an EMA and ``ema=True``, else ``params``) — no
optimiser moments, so evaluating a large model needs no room for them.

It never writes to the workdir. (``train.Checkpointer`` sets aside incomplete step directories when
it opens one; a sampler or evaluator running beside a live training job must not delete the tmp
directory of a save in progress, so this reads step directories directly.)

The mesh: the run's ``mesh`` config with ``data=-1`` when no axis is −1, so that a checkpoint
trained on N devices restores onto the devices here (``fsdp`` / ``tensor`` as trained).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.sharding import Mesh

from starflow2_jax import parallel
from starflow2_jax.train import checkpoint as ckpt_lib
from starflow2_jax.train.config_schema import base_config, validate
from starflow2_jax.train.optim import make_optimizer
from starflow2_jax.train.step import StateShardings, state_shardings
from starflow2_jax.train.task import Task
from starflow2_jax.train.tasks import task_from_config


class Restored(NamedTuple):
    """What ``restore_workdir`` returns.

    config: the run's resolved config; task: its task (``FlowTask``, ``FAETask``); params / extra: the
    restored trainable parameters (EMA or raw, see ``used_ema``) and non-trainable variables, laid
    out on ``mesh``;
    step: the checkpoint's step; step_dir: its directory; shardings: the state's shardings on ``mesh``.
    """

    config: ml_collections.ConfigDict
    task: Task
    params: Any
    extra: Any
    step: int
    used_ema: bool
    mesh: Mesh
    shardings: StateShardings
    step_dir: str


def latest_step_dir(workdir: os.PathLike | str) -> tuple[int, epath.Path]:
    """``(step, directory)`` of the latest complete checkpoint of ``workdir``.

    Raises FileNotFoundError naming the workdir when it or its checkpoints are missing.
    """
    workdir = ckpt_lib.absolute_path(workdir)  # Orbax: absolute
    if not workdir.exists():
        raise FileNotFoundError(f"--workdir {os.fspath(workdir)!r} does not exist")
    root = workdir / ckpt_lib.CHECKPOINT_SUBDIR
    steps = ckpt_lib.complete_steps(root)
    if not steps:
        incomplete = [p.name for p in ckpt_lib.find_incomplete(root)]
        extra = f" (only incomplete ones: {incomplete})" if incomplete else ""
        raise FileNotFoundError(f"--workdir {os.fspath(workdir)!r} has no complete checkpoint in "
                                f"{os.fspath(root)}{extra}; train first (starflow2 train --workdir ...)")
    for path in ckpt_lib.find_incomplete(root):
        logging.warning("ignoring incomplete checkpoint directory %s", os.fspath(path))
    return steps[-1], root / str(steps[-1])


def read_step_config(step_dir: os.PathLike | str) -> ml_collections.ConfigDict:
    """The validated config stored with the checkpoint in ``step_dir`` (its ``config`` item)."""
    path = epath.Path(step_dir) / "config"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {os.fspath(step_dir)!r} has no stored config (expected {os.fspath(path)})")
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as reader:
        stored = reader.restore(path)
    config = _with_defaults(base_config(), stored)
    try:
        return validate(config)
    except ValueError as error:
        raise ValueError(f"the config stored in {os.fspath(path)} is not valid: {error}") from error


def _with_defaults(defaults: ml_collections.ConfigDict, stored: dict) -> ml_collections.ConfigDict:
    """``stored`` over ``defaults``, recursively: fields added to the schema after a run was saved take
    their defaults (which reproduce the old behaviour), so older checkpoints keep restoring."""
    merged = defaults.to_dict()

    def merge(into: dict, new: dict) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict) and key not in ("kwargs", "dinov2"):
                merge(into[key], value)
            else:
                into[key] = value

    merge(merged, dict(stored))
    return ml_collections.ConfigDict(merged)


def restore_mesh(config) -> Mesh:
    """The mesh to restore ``config``'s run on here (see the module docstring)."""
    shape = {axis: int(config.mesh[axis]) for axis in ("data", "fsdp", "tensor")}
    if -1 not in shape.values():
        shape["data"] = -1
    try:
        return parallel.make_mesh(shape)
    except ValueError as error:
        raise ValueError(f"the run's mesh {dict(config.mesh)} does not fit the {jax.device_count()} devices here "
                         f"(fsdp × tensor must divide the device count): {error}") from error


def restore_workdir(workdir: os.PathLike | str, *, ema: bool = True) -> Restored:
    """Restores the latest complete checkpoint of ``workdir`` (see the module docstring).

    ``ema``: use the EMA parameters when the run kept them (``optim.ema_decay > 0``); the raw
    parameters otherwise. Raises FileNotFoundError / ValueError naming the workdir or file.
    """
    step, step_dir = latest_step_dir(workdir)
    config = read_step_config(step_dir)
    task = task_from_config(config)
    mesh = restore_mesh(config)
    has_ema = float(config.optim.ema_decay) > 0
    optimizer, _ = make_optimizer(config.optim, int(config.train.steps), trainable=getattr(task, "trainable", None))
    shardings = state_shardings(task, optimizer, mesh, ema=has_ema)
    name = "ema_params" if (ema and has_ema) else "params"
    target = {name: getattr(shardings.abstract_state, name)}
    with ocp.PyTreeCheckpointer() as reader:
        restored = reader.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    with ocp.StandardCheckpointer() as reader:
        extra = reader.restore(step_dir / "extra", shardings.abstract_extra)
    logging.info("restored %s of step %d from %s", name, step, os.fspath(step_dir))
    return Restored(config=config, task=task, params=restored[name], extra=extra, step=step,
                    used_ema=name == "ema_params", mesh=mesh, shardings=shardings, step_dir=os.fspath(step_dir))

"""A run on disk: a workdir's stored config, latest complete step, (EMA) parameters and frozen parts.

The pieces, each usable alone (none builds an optimiser; only ``restore_workdir`` builds a Task):

- ``latest_step_dir(workdir)``: the latest *complete* step under ``<workdir>/checkpoints`` (see
  ``train.checkpoint.complete_steps``), verified against its checksum manifest (``train.manifest``;
  once per process and step; ``skip_verification()`` turns it off, e.g. ``--no-verify``): a damaged
  step is a ``CheckpointDamagedError`` naming the damaged file and the newest intact step;
- ``read_step_config(step_dir)``: the config stored with it, defaults filled in for fields added
  after the run was saved, validated;
- ``restore_mesh(config)``: the run's ``mesh`` with ``data=-1`` when no axis is −1, so that a
  checkpoint trained on N devices restores onto the devices here (``fsdp`` / ``tensor`` as trained);
- ``read_params(step_dir, abstract, ema=)``: only the parameter tree asked for (``ema_params`` or
  ``params``) — no optimiser moments, so evaluating a large model needs no room for them;
- ``load_frozen(config, abstract_extra)``: the family's frozen parts from the sources the run
  recorded, checked against the recorded fingerprints;
- ``restore_workdir(workdir)``: all of it plus the family's Task, for sampling and evaluation.

It never writes to the workdir. (``train.Checkpointer`` sets aside incomplete step directories when
it opens one; a sampler or evaluator running beside a live training job must not delete the tmp
directory of a save in progress, so this reads step directories directly.)
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, NamedTuple

import jax
import ml_collections
from absl import logging
from etils import epath
from jax.sharding import Mesh

from starflow2_jax import parallel
from starflow2_jax.train import checkpoint as ckpt_lib
from starflow2_jax.train import families
from starflow2_jax.train import frozen as frozen_lib
from starflow2_jax.train import manifest
from starflow2_jax.train.config_schema import base_config, validate
from starflow2_jax.train.step import ModelShardings, model_shardings
from starflow2_jax.train.task import Task


class Restored(NamedTuple):
    """What ``restore_workdir`` returns.

    config: the run's resolved config; task: its task (``FlowTask``, ``FAETask``, …); params / extra:
    the restored trainable parameters (EMA or raw, see ``used_ema``) and non-trainable variables (the
    frozen parts included), laid out on ``mesh``; step: the checkpoint's step; step_dir: its
    directory; shardings: the params' and extra vars' shardings on ``mesh`` (``step.ModelShardings``).
    """

    config: ml_collections.ConfigDict
    task: Task
    params: Any
    extra: Any
    step: int
    used_ema: bool
    mesh: Mesh
    shardings: ModelShardings
    step_dir: str


_VERIFY = [True]
_VERIFIED: set[tuple] = set()  # stat signatures of the step directories verified in this process


def _stat_signature(step_dir: epath.Path) -> tuple:
    """The step directory with every file's path, size and mtime (local disks; object stores: the
    path only), so a step is verified again when any file changed since."""
    text = os.fspath(step_dir)
    if "://" in text:
        return (text,)
    entries = []
    for root, _, names in os.walk(text):
        for name in names:
            stat = os.stat(os.path.join(root, name))
            entries.append((os.path.join(root, name), stat.st_size, stat.st_mtime_ns))
    return (text, *sorted(entries))


@contextlib.contextmanager
def skip_verification() -> Iterator[None]:
    """Inside it, ``latest_step_dir`` does not check checksum manifests (huge checkpoints)."""
    _VERIFY.append(False)
    try:
        yield
    finally:
        _VERIFY.pop()


def latest_step_dir(workdir: os.PathLike | str) -> tuple[int, epath.Path]:
    """``(step, directory)`` of the latest complete checkpoint of ``workdir``, verified (see the
    module docstring).

    Raises FileNotFoundError naming the workdir when it or its checkpoints are missing, and
    ``manifest.CheckpointDamagedError`` (a ValueError) when the step is damaged.
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
    step_dir = root / str(steps[-1])
    signature = _stat_signature(step_dir)
    if _VERIFY[-1] and signature not in _VERIFIED:
        manifest.verify_step(root, steps[-1], steps, hint="this reader uses the latest step only: move the "
                             "damaged step aside, or resume training from the intact one with --resume-intact")
        _VERIFIED.add(signature)
    return steps[-1], step_dir


def read_step_config(step_dir: os.PathLike | str) -> ml_collections.ConfigDict:
    """The validated config stored with the checkpoint in ``step_dir`` (its ``config`` item)."""
    stored = ckpt_lib.read_config_json(step_dir)
    config = _with_defaults(base_config(), stored)
    try:
        return validate(config)
    except ValueError as error:
        raise ValueError(f"the config stored in {os.fspath(epath.Path(step_dir) / 'config')} is not valid: "
                         f"{error}") from error


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


def has_ema(config) -> bool:
    """Whether the run kept an EMA of its parameters."""
    return float(config.optim.ema_decay) > 0


def read_params(step_dir: os.PathLike | str, abstract_params, *, ema: bool) -> Any:
    """The ``ema_params`` (``ema=True``) or ``params`` of the step's train state, laid out as
    ``abstract_params`` (no optimiser state is read). EMA leaves the run did not average (frozen
    leaves of its task) are taken from ``params``."""
    name = "ema_params" if ema else "params"
    stored = {k.split("/", 1)[1] for k in ckpt_lib.stored_shapes(epath.Path(step_dir) / "state")
              if k.startswith(name + "/")}
    if ema:
        averaged = ckpt_lib.flat_shapes(abstract_params)
        if set(averaged) - stored:  # leaves without an average: raw params there
            raw = ckpt_lib.restore_item(step_dir, "state", {"params": abstract_params})["params"]
            flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
            target = jax.tree_util.tree_unflatten(
                jax.tree.structure(abstract_params),
                [a if ckpt_lib.key_path(p) in stored else None for p, a in flat])
            restored = ckpt_lib.restore_item(step_dir, "state", {name: target})[name]
            return jax.tree.map(lambda r, p: p if r is None else r, restored, raw, is_leaf=lambda x: x is None)
    return ckpt_lib.restore_item(step_dir, "state", {name: abstract_params})[name]


def load_frozen(config, abstract_extra, *, allow_changed: bool = False, skip: tuple[str, ...] = ()
                ) -> tuple[dict, dict]:
    """``(parts, records)``: the frozen parts of ``config``'s family (except those named in ``skip``)
    loaded from the sources its stored ``frozen`` records name (a run from before the records: the
    configured sources), placed as ``abstract_extra``. ValueError naming a part whose content no
    longer matches its recorded fingerprint, unless ``allow_changed``."""
    family = families.get(config.model.family)
    stored = config.frozen.to_dict() if config.frozen else {}
    wanted = [part for part in family.frozen_parts(config) if part.name not in skip]
    parts, records = frozen_lib.load_parts(wanted, abstract_extra, seed=int(config.seed), records=stored or None)
    frozen_lib.check_unchanged(stored, records, allow=allow_changed, where="the run's checkpoint")
    return parts, records


def restore_workdir(workdir: os.PathLike | str, *, ema: bool = True, allow_frozen_change: bool = False) -> Restored:
    """Restores the latest complete checkpoint of ``workdir`` (see the module docstring).

    ``ema``: use the EMA parameters when the run kept them (``optim.ema_decay > 0``); the raw
    parameters otherwise. Raises FileNotFoundError / ValueError naming the workdir or file.
    """
    step, step_dir = latest_step_dir(workdir)
    config = read_step_config(step_dir)
    task = families.make_task(config)
    mesh = restore_mesh(config)
    shardings = model_shardings(task, mesh)
    use_ema = ema and has_ema(config)
    params = read_params(step_dir, shardings.abstract_params, ema=use_ema)
    in_step = {k.split("/")[0] for k in ckpt_lib.stored_shapes(step_dir / "extra")} if (step_dir / "extra").exists() \
        else set()
    kept = tuple(name for name in in_step if name not in config.frozen)  # runs from before frozen parts
    frozen, _ = load_frozen(config, shardings.abstract_extra, allow_changed=allow_frozen_change, skip=kept)
    saved = {k: v for k, v in shardings.abstract_extra.items() if k not in frozen}
    extra = ckpt_lib.restore_item(step_dir, "extra", saved) if jax.tree.leaves(saved) else saved
    logging.info("restored %s of step %d from %s", "ema_params" if use_ema else "params", step, os.fspath(step_dir))
    return Restored(config=config, task=task, params=params, extra={**extra, **frozen}, step=step, used_ema=use_ema,
                    mesh=mesh, shardings=shardings, step_dir=os.fspath(step_dir))

"""Checkpoints: an Orbax ``CheckpointManager`` over ``<workdir>/checkpoints/<step>/``.

Items per step: ``state`` (the ``TrainState``), ``extra`` (non-trainable variables, without the
family's frozen parts: ``train.frozen``), ``data_iter`` (every process's grain iterator state, one
file each) and ``config`` (JSON; it records each frozen part's source and fingerprint). Restores take abstract
targets carrying the *current* mesh's shardings, so a checkpoint restores onto any mesh.

Data position across process counts: every process saves its grain iterator state (the number of
batches it has read). The pipeline (``data.pipeline.make_pipeline``) shuffles and preprocesses the
*global* stream before sharding it by process, so global batch k holds the same examples (and the
same random values) for any process count, and all processes save the same state. A restart on a
different process count therefore gives every process the state process 0 saved: the next global
batch is the one an uninterrupted run would have drawn, its rows spread over the devices in another
order. States that differ between the saved processes (a custom stream) cannot be mapped and are an
error naming the files.

Retention: the ``keep_last`` newest steps, plus every step that is a multiple of ``keep_every``
(Orbax ``LatestN`` ∪ ``EveryNSteps``; a step kept by either survives).

Completeness: Orbax writes a step into ``<step>.orbax-checkpoint-tmp*`` and renames it when done
(on object stores it instead writes ``commit_success.txt`` last). A process killed mid-save leaves
a tmp directory, or — where renames are not atomic — a ``<step>`` directory without the commit
marker (``commit_success.txt`` and ``_CHECKPOINT_METADATA``), which Orbax 0.12.8 on a local disk
would list as a valid step. ``Checkpointer`` logs a warning naming every such directory when it
opens the directory; tmp directories are then deleted, marker-less step directories renamed to
``<step>.incomplete`` (kept for inspection), so that the latest *complete* step is used.

A save is refused (``False`` returned, error logged) when the state is not finite: one device scalar
is checked before every save.

Verification: every committed step gets a checksum manifest (``train.manifest``: ``<step>/checksums.json``,
a size and CRC-32 per file), written by process 0 once the step's save has finished (before the next
save, at ``wait()`` and at ``close()``); restores check it (``train.manifest.verify_step``).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from starflow2_jax.train import manifest
from starflow2_jax.train.state import TrainState, state_is_finite

CHECKPOINT_SUBDIR = "checkpoints"
TMP_MARKER = ".orbax-checkpoint-tmp"
COMMIT_FILES = ("commit_success.txt", "_CHECKPOINT_METADATA")


def find_incomplete(directory: os.PathLike | str) -> list[epath.Path]:
    """Step directories under ``directory`` that an interrupted save left behind (see module doc)."""
    directory = epath.Path(directory)
    if not directory.exists():
        return []
    found = []
    for entry in sorted(directory.iterdir(), key=lambda p: p.name):
        if not entry.is_dir():
            continue
        if TMP_MARKER in entry.name:
            found.append(entry)
        elif re.fullmatch(r"\d+", entry.name) and not all((entry / f).exists() for f in COMMIT_FILES):
            found.append(entry)
    return found


def complete_steps(directory: os.PathLike | str) -> list[int]:
    """Sorted steps of the complete checkpoints directly under ``directory``."""
    directory = epath.Path(directory)
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.is_dir() and re.fullmatch(r"\d+", p.name) and all((p / f).exists() for f in COMMIT_FILES))


def _set_aside_incomplete(directory: epath.Path) -> None:
    """Warns about every incomplete step directory; deletes tmp dirs, renames marker-less ``<step>`` dirs
    aside (process 0 only; the others wait)."""
    incomplete = find_incomplete(directory)
    if not incomplete:
        return
    latest = complete_steps(directory)
    resume = f"step {latest[-1]}" if latest else "no complete step (nothing to resume)"
    for path in incomplete:
        logging.warning("ignoring incomplete checkpoint directory %s (interrupted save: no commit marker); "
                        "the latest complete checkpoint is %s", os.fspath(path), resume)
    if jax.process_index() == 0:
        for path in incomplete:
            if TMP_MARKER in path.name:  # a partial write that never got renamed: nothing to keep
                path.rmtree()
                logging.warning("deleted incomplete checkpoint directory %s", os.fspath(path))
                continue
            target = path.parent / f"{path.name}.incomplete"
            suffix = 1
            while target.exists():
                target = path.parent / f"{path.name}.incomplete{suffix}"
                suffix += 1
            path.rename(target)
            logging.warning("moved incomplete checkpoint directory %s to %s", os.fspath(path), os.fspath(target))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("starflow2_jax.checkpoint.set_aside_incomplete")


class Checkpointer:
    """Saves and restores ``(TrainState, extra_vars, data iterator, config)`` under ``directory``.

    Args:
      directory: the checkpoint root (``<workdir>/checkpoints``); created if missing.
      keep_last: keep the N newest steps; keep_every: also keep multiples of K (0: off).
      async_save: write in a background thread (``wait()`` before reading or exiting).
    """

    def __init__(self, directory: os.PathLike | str, *, keep_last: int = 3, keep_every: int = 0,
                 async_save: bool = True):
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}: expected >= 1")
        self.directory = epath.Path(directory)
        _set_aside_incomplete(self.directory)
        keep = [policies.LatestN(n=int(keep_last))]
        if keep_every:
            keep.append(policies.EveryNSteps(interval_steps=int(keep_every)))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep), enable_async_checkpointing=async_save,
            create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, extra_vars: Any, data_iter: grain.DatasetIterator | None,
             config_json: dict, *, wait: bool = False) -> bool:
        """Saves ``step`` (async unless ``wait``); returns False without writing anything when the
        state is non-finite (logged as an error) or the step already exists."""
        if not bool(jax.device_get(state_is_finite(state))):
            logging.error("refusing to write checkpoint step %d: the train state is not finite", step)
            return False
        if step in self.manager.all_steps():
            return False
        self.wait()  # the previous save (Orbax would wait for it too) and its manifest
        items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_json))
        if jax.tree.leaves(extra_vars):  # Orbax refuses an empty item (e.g. every extra var a frozen part)
            items["extra"] = ocp.args.StandardSave(extra_vars)
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        if wait:
            self.manager.wait_until_finished()
        return True

    def restore(self, step: int, abstract_state, abstract_extra, data_iter: grain.DatasetIterator | None):
        """``(state, extra_vars)`` of ``step`` laid out as the abstract targets' shardings; restores
        ``data_iter`` in place (when given)."""
        items = dict(state=ocp.args.StandardRestore(abstract_state))
        saved_states = None
        if data_iter is not None:
            saved_states = _data_states(self.directory / str(step) / "data_iter")
            if f"process_{jax.process_index()}-of-{jax.process_count()}.json" in saved_states:
                items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
                saved_states = None
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if saved_states is not None:
            _restore_data_position(data_iter, saved_states, step)
        # extra: a partial restore, so a step saved before frozen parts left it (they were in it) resumes
        extra = restore_item(self.directory / str(step), "extra", abstract_extra) if jax.tree.leaves(abstract_extra) \
            else abstract_extra
        return restored.state, extra

    def read_config(self, step: int | None = None) -> dict:
        """The JSON config stored with ``step`` (default: the latest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {os.fspath(self.directory)}")
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def wait(self) -> None:
        """Blocks until every pending async save is committed; then writes the missing manifests."""
        self.manager.wait_until_finished()
        self._write_manifests()

    def _write_manifests(self) -> None:
        """A checksum manifest for every committed step that lacks one (process 0)."""
        if jax.process_index() != 0:
            return
        for step in complete_steps(self.directory):
            step_dir = self.directory / str(step)
            if not manifest.has_manifest(step_dir):
                try:
                    manifest.write(step_dir)
                except FileNotFoundError:  # removed meanwhile by the retention policy
                    logging.info("checkpoint step %d was removed while its manifest was written", step)

    def close(self) -> None:
        self.wait()
        self.manager.close()


def _data_states(directory: epath.Path) -> dict[str, str]:
    """``{file name: JSON text}`` of the per-process iterator states saved in ``directory``."""
    if not directory.exists():
        return {}
    return {p.name: p.read_text() for p in directory.iterdir() if re.fullmatch(r"process_\d+-of-\d+\.json", p.name)}


def _restore_data_position(data_iter: grain.DatasetIterator, saved: dict[str, str], step: int) -> None:
    """The process-count-change policy of the module docstring: every process takes the one state
    all saved processes agree on; raises ValueError when there is none or they differ."""
    if not saved:
        raise ValueError(f"checkpoint step {step} has no data iterator state to restore the data position from")
    states = {name: json.loads(text) for name, text in saved.items()}
    distinct = {json.dumps(state, sort_keys=True) for state in states.values()}
    if len(distinct) != 1:
        raise ValueError(f"checkpoint step {step} was saved by {len(states)} processes with different data iterator "
                         f"states ({sorted(states)}); they cannot be mapped onto {jax.process_count()} process(es)")
    state = next(iter(states.values()))
    logging.warning("checkpoint step %d was saved by %d process(es), this run has %d: every process resumes the "
                    "data at the saved position %s", step, len(states), jax.process_count(), state)
    data_iter.set_state(state)


def absolute_path(path: os.PathLike | str) -> epath.Path:
    """``path`` as Orbax needs it: absolute (``~`` expanded, relative to the working directory), URLs
    such as ``gs://…`` unchanged."""
    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(os.path.expanduser(text)))


def resolve_step_dir(path: os.PathLike | str) -> epath.Path:
    """The step directory an ``init_from`` path names: a step dir (has ``state/``), a checkpoint root
    (its latest complete step) or a workdir (``checkpoints/`` inside); absolute. Raises FileNotFoundError."""
    path = absolute_path(path)
    if (path / "state").exists():
        return path
    for root in (path / CHECKPOINT_SUBDIR, path):
        steps = complete_steps(root)
        if steps:
            return root / str(steps[-1])
    raise FileNotFoundError(f"train.init_from={os.fspath(path)!r}: no complete Orbax checkpoint there "
                            f"(expected a workdir, its {CHECKPOINT_SUBDIR}/ directory, or a step directory)")


def read_config_json(step_dir: os.PathLike | str) -> dict:
    """The raw JSON config stored with the checkpoint in ``step_dir`` (its ``config`` item), not
    validated (``train.restore.read_step_config`` fills defaults and validates)."""
    path = epath.Path(step_dir) / "config"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {os.fspath(step_dir)!r} has no stored config (expected {os.fspath(path)})")
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as reader:
        return dict(reader.restore(path))


def stored_shapes(item_dir: os.PathLike | str) -> dict[str, tuple]:
    """``{'a/b/c': (shape, dtype name)}`` of every array an Orbax PyTree item directory holds (its
    metadata only; nothing is read)."""
    metadata = ocp.PyTreeCheckpointer().metadata(epath.Path(item_dir))
    tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {key_path(path): (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in flat if hasattr(leaf, "shape")}


def key_path(path) -> str:
    """A pytree key path as ``'a/b/c'`` (dict keys, sequence indices, attribute names)."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def flat_shapes(tree) -> dict[str, tuple]:
    """``{'a/b/c': shape}`` of every array (or ``ShapeDtypeStruct``) leaf of ``tree``."""
    return {key_path(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tree_differences(expected: dict[str, tuple], found: dict[str, tuple]) -> tuple[list, list, list]:
    """``(missing, unexpected, mis-shaped)`` between two ``{path: shape}`` maps: paths only in
    ``expected``, paths only in ``found``, and ``'path: expected S, found T'`` lines."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [f"{k}: expected {expected[k]}, found {found[k]}" for k in sorted(set(expected) & set(found))
                 if tuple(expected[k]) != tuple(found[k])]
    return missing, unexpected, misshaped


def describe_differences(missing, unexpected, misshaped, limit: int = 50) -> str:
    """One message listing every difference (at most ``limit`` per kind, with the count)."""
    lines = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = "\n    ".join(items[:limit])
            more = f"\n    … and {len(items) - limit} more" if len(items) > limit else ""
            lines.append(f"  {len(items)} {title}:\n    {shown}{more}")
    return "\n".join(lines)


def restore_item(step_dir: os.PathLike | str, item: str, target) -> Any:
    """The subtree ``target`` (abstract arrays with shardings; a prefix of what is stored) of the
    PyTree item ``item`` of ``step_dir``; stored entries ``target`` lacks are not read."""
    with ocp.PyTreeCheckpointer() as reader:
        return reader.restore(epath.Path(step_dir) / item, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))


def _drop(tree: dict, paths: set[str], prefix: str = "") -> dict:
    """``tree`` (nested dicts) without the leaves at ``paths`` (and without emptied dicts)."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            kept = _drop(value, paths, path + "/")
            if kept:
                out[key] = kept
        elif path not in paths:
            out[key] = value
    return out


def _graft(base: dict, new: dict) -> dict:
    """``base`` with the leaves of ``new`` (nested dicts, a subset of ``base``'s paths) put in."""
    out = dict(base)
    for key, value in new.items():
        out[key] = _graft(base[key], value) if isinstance(value, dict) else value
    return out


def check_init_from(path: os.PathLike | str, abstract_params, abstract_extra, *,
                    new_patterns: tuple[str, ...] = ()) -> tuple[Any, list[str], dict]:
    """``(step dir, new parameter paths, expected extra shapes)`` when the checkpoint at ``path`` fits
    (see ``load_params``); reads metadata only, so a run can check before it writes anything.
    ValueError listing every difference otherwise."""
    import fnmatch

    step_dir = resolve_step_dir(path)
    if re.fullmatch(r"\d+", step_dir.name):  # a damaged source is named, not half-read
        manifest.verify_step(step_dir.parent, int(step_dir.name), complete_steps(step_dir.parent))
    expected = flat_shapes(abstract_params)
    new = sorted(k for k in expected if any(fnmatch.fnmatchcase(k, p) for p in new_patterns))
    unused = [p for p in new_patterns if not any(fnmatch.fnmatchcase(k, p) for k in expected)]
    stored = stored_shapes(step_dir / "state")
    found = {k[len("params/"):]: shape for k, (shape, _) in stored.items() if k.startswith("params/")}
    missing, unexpected, misshaped = tree_differences({k: v for k, v in expected.items() if k not in new},
                                                      {k: v for k, v in found.items() if k not in new})
    extra_expected = flat_shapes(abstract_extra)
    extra_found = {k: shape for k, (shape, _) in stored_shapes(step_dir / "extra").items()} \
        if (step_dir / "extra").exists() else {}
    e_missing, _, e_misshaped = tree_differences(extra_expected, extra_found)  # stored frozen parts: ignored
    missing += [f"(extra) {k}" for k in e_missing]
    misshaped += [f"(extra) {k}" for k in e_misshaped]
    if missing or unexpected or misshaped or unused:
        unused_text = f"\n  train.init_new patterns matching no parameter: {unused}" if unused else ""
        raise ValueError(
            f"train.init_from={os.fspath(path)!r}: the parameters of {os.fspath(step_dir)} do not match this "
            f"run's (declare the parameters that are new in this stage in train.init_new):\n"
            f"{describe_differences(missing, unexpected, misshaped)}{unused_text}")
    return step_dir, new, extra_expected


def load_params(path: os.PathLike | str, abstract_params, abstract_extra, *, fresh_params=None,
                new_patterns: tuple[str, ...] = ()) -> tuple[Any, Any]:
    """``(params, extra_vars)`` from the checkpoint at ``path`` (see ``resolve_step_dir``) only — no
    optimiser state — laid out as the abstract targets' shardings.

    The stored parameter tree must equal ``abstract_params`` (paths and shapes) except for the
    parameters matching ``new_patterns`` (fnmatch over ``'a/b/c'`` paths): those come from
    ``fresh_params`` (this run's fresh initialisation) and are logged. Otherwise ValueError listing
    every missing, unexpected and mis-shaped parameter (and every pattern that matches nothing).
    ``abstract_extra``: the non-frozen extra variables, restored as stored (same check).
    """
    step_dir, new, extra_expected = check_init_from(path, abstract_params, abstract_extra, new_patterns=new_patterns)
    target = {"params": _drop(abstract_params, set(new))}
    restored = restore_item(step_dir, "state", target)["params"]
    params = _graft(fresh_params, restored) if new else restored
    extra = restore_item(step_dir, "extra", abstract_extra) if extra_expected else abstract_extra
    if new:
        logging.info("train.init_from: %d parameters are new in this stage and initialised fresh (train.init_new "
                     "%s):\n  %s", len(new), list(new_patterns), "\n  ".join(new))
    logging.info("initialised params from %s", os.fspath(step_dir))
    return params, extra

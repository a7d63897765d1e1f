"""Frozen pretrained parts: one mechanism to load them at every start and never re-save them.

A model family names its frozen parts (``FrozenPart``; e.g. the FAE's DINOv2, the FAE under a flow
on FAE latents, next the STARFlow2 VLM). Each part is a top-level entry of the task's ``extra_vars``
(``part.name``) and has a *source*, a config field (``part.field``) holding one of:

    ''            random weights from the run's seed (``part.init``: tests, tiny presets); with
                  ``train.init_from`` the part of that run instead (its copy, else the source it
                  recorded), so a later stage keeps it
    HF directory  config.json + *.safetensors, read by the family (``part.from_hf``)
    Orbax dir     a checkpoint with a ``params`` item: written by ``starflow2 convert`` or a copy below
    a workdir     an earlier run: its copy ``<workdir>/frozen/<name>`` when present, else the trained
                  weights the family reads from it (``part.from_run``: the FAE under a flow), else the
                  source that run recorded for the part (followed recursively)

``load_parts`` loads every part at every start (fresh, resume, ``init_from``) straight into the
shardings of the task's abstract ``extra_vars``, cast to the part's dtype (floating leaves; default:
the compute dtype), checks its tree (paths and shapes) and returns a ``FrozenRecord`` per part: the
resolved source and a fingerprint — a hash of the paths, shapes and dtypes (``structure``) and a
content checksum (``content``). The trainer stores the records in the config (``config.frozen``), so
the step checkpoints need none of the weights; ``check_unchanged`` compares a resume's records with
the stored ones (error naming the part unless ``train.allow_frozen_change``).

Content checksum: computed on the device from the arrays *as loaded* (one jitted pass over the
sharded leaves: the sum over elements of bits × (2654435761·index + 1), mod 2³², per leaf; the
host hashes the per-leaf sums with SHA-256). The source files are read once — by the load itself —
whatever the part's size; a part that changes dtype changes its fingerprint. It detects changed
weights, not an adversary.

``write_copy`` writes ``<workdir>/frozen/<name>`` once (Orbax: written to a temporary directory and
renamed, with the record as JSON beside the params), for a run that should not depend on its sources.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from starflow2_jax.train import checkpoint as ckpt_lib

FROZEN_SUBDIR = "frozen"
KINDS = ("init", "hf", "orbax", "workdir")


@dataclasses.dataclass(frozen=True)
class FrozenPart:
    """One frozen part (see the module docstring).

    name: its key in ``extra_vars``, its record and its copy's directory name; field: the config
    field naming its source (in errors); source: that field's value; dtype: the dtype its floating
    leaves are loaded in; init: ``seed -> tree`` (jit-able), the random weights of a '' source;
    from_hf: ``(directory, abstract) -> tree`` for Hugging Face directories (None: not accepted);
    from_run: ``(workdir, abstract) -> tree`` for an earlier run whose trained weights form the part
    (None: a workdir source means that run's copy or recorded source of the same part).
    """

    name: str
    field: str
    source: str
    dtype: str
    init: Callable[[int], Any] | None = None
    from_hf: Callable[[str, Any], Any] | None = None
    from_run: Callable[[str, Any], Any] | None = None


def _checksums(tree) -> Any:
    """Per-leaf uint32 checksums (see the module docstring), computed where the leaves live."""

    def one(x):
        x = jnp.asarray(x)
        if x.dtype == jnp.bool_:
            bits = x.astype(jnp.uint32)
        else:
            width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
            if width is None:
                raise ValueError(f"frozen parts hold 8-, 16- or 32-bit arrays; got {x.dtype}")
            bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
        flat = bits.reshape(-1)
        index = jnp.arange(flat.size, dtype=jnp.uint32)
        return jnp.sum(flat * (index * jnp.uint32(2654435761) + jnp.uint32(1)), dtype=jnp.uint32)

    return jax.jit(lambda t: jax.tree.map(one, t))(tree)


def fingerprint(tree) -> dict:
    """``{'structure', 'content', 'parameters', 'bytes'}`` of an array tree (see the module docstring)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    described = [(ckpt_lib.key_path(p), list(x.shape), str(x.dtype)) for p, x in flat]
    sums = jax.device_get(_checksums([x for _, x in flat]))
    structure = hashlib.sha256(json.dumps(described).encode()).hexdigest()[:16]
    content = hashlib.sha256(np.asarray(sums, np.uint32).tobytes() + structure.encode()).hexdigest()[:16]
    return {"structure": structure, "content": content, "parameters": int(sum(np.prod(x.shape) for _, x in flat)),
            "bytes": int(sum(np.prod(x.shape) * x.dtype.itemsize for _, x in flat))}


def _cast(part: FrozenPart, abstract):
    """``abstract`` with its floating leaves in ``part.dtype`` (shardings kept)."""
    dtype = jnp.dtype(part.dtype)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype if jnp.issubdtype(a.dtype, jnp.floating)
                                                       else a.dtype, sharding=a.sharding), abstract)


def _place(part: FrozenPart, tree, target, where: str):
    """``tree`` checked against ``target`` (paths, shapes), cast and put in its shardings."""
    expected, found = ckpt_lib.flat_shapes(target), ckpt_lib.flat_shapes(tree)
    differences = ckpt_lib.tree_differences(expected, found)
    if any(differences):
        raise ValueError(f"{part.field}: the frozen part {part.name!r} read from {where} does not have the "
                         f"parameters this model needs:\n{ckpt_lib.describe_differences(*differences)}")
    return jax.tree.map(lambda x, t: jax.device_put(jnp.asarray(x, t.dtype), t.sharding), tree, target)


def source_kind(part: FrozenPart, path: str) -> str:
    """'hf' | 'orbax' | 'workdir' for an existing directory ``path``; FileNotFoundError / ValueError
    naming ``part.field`` otherwise."""
    what = ("a Hugging Face directory (config.json + *.safetensors), an Orbax checkpoint with a 'params' item "
            "(starflow2 convert) or an earlier run's workdir")
    if "://" not in path and not os.path.isdir(path):
        raise FileNotFoundError(f"{part.field}={path!r}: no such directory (expected {what})")
    p = epath.Path(path)
    if (p / ckpt_lib.CHECKPOINT_SUBDIR).exists() or (p / FROZEN_SUBDIR).exists():
        return "workdir"
    if (p / "params").exists():
        return "orbax"
    if (p / "config.json").exists() and any(f.name.endswith(".safetensors") for f in p.iterdir()):
        return "hf"
    raise ValueError(f"{part.field}={path!r}: not {what}")


def _read_orbax(part: FrozenPart, path: str, target):
    """The ``params`` item of an Orbax checkpoint, checked against ``target`` before it is read."""
    item = epath.Path(path) / "params"
    stored = {k: shape for k, (shape, _) in ckpt_lib.stored_shapes(item).items()}
    differences = ckpt_lib.tree_differences(ckpt_lib.flat_shapes(target), stored)
    if any(differences):
        raise ValueError(f"{part.field}: the frozen part {part.name!r} in {path} does not have the parameters this "
                         f"model needs:\n{ckpt_lib.describe_differences(*differences)}")
    return ckpt_lib.restore_item(path, "params", target)


def _recorded(workdir: str, name: str) -> dict | None:
    """The record of part ``name`` stored with the latest checkpoint of ``workdir`` (None: none)."""
    try:
        step_dir = ckpt_lib.resolve_step_dir(workdir)
    except FileNotFoundError:
        return None
    return dict(ckpt_lib.read_config_json(step_dir).get("frozen", {})).get(name)


def _load(part: FrozenPart, kind: str, source: str, seed: int | None, target, depth: int = 0):
    if depth > 8:
        raise ValueError(f"{part.field}: the frozen part {part.name!r} is recorded in a chain of more than 8 runs")
    if kind == "init":
        if part.init is None:
            raise ValueError(f"{part.field} is empty: the frozen part {part.name!r} needs a source")
        shardings = jax.tree.map(lambda t: t.sharding, target)
        return jax.jit(lambda: jax.tree.map(lambda x, t: x.astype(t.dtype), part.init(int(seed)), target),
                       out_shardings=shardings)()
    if kind == "hf":
        if part.from_hf is None:
            raise ValueError(f"{part.field}={source!r}: the frozen part {part.name!r} cannot be read from a Hugging "
                             f"Face directory")
        return _place(part, part.from_hf(source, target), target, source)
    if kind == "orbax":
        return _read_orbax(part, source, target)
    copy = epath.Path(source) / FROZEN_SUBDIR / part.name
    if copy.exists():
        return _read_orbax(part, os.fspath(copy), target)
    if part.from_run is not None:
        return _place(part, part.from_run(source, target), target, source)
    record = _recorded(source, part.name)
    if record is not None:
        return _load(part, record["kind"], record["source"], record.get("seed"), target, depth + 1)
    step_dir = ckpt_lib.resolve_step_dir(source)  # runs from before frozen parts: the part in the step's extra
    extra_dir = step_dir / "extra"
    if extra_dir.exists() and part.name in {k.split("/")[0] for k in ckpt_lib.stored_shapes(extra_dir)}:
        return ckpt_lib.restore_item(step_dir, "extra", {part.name: target})[part.name]
    raise ValueError(f"{part.field}={source!r}: that run has no frozen part {part.name!r} (no {os.fspath(copy)}, "
                     f"no record in its stored config, nothing in its checkpoint)")


def resolve(part: FrozenPart, *, seed: int, init_from: str = "") -> dict:
    """``{'kind', 'source', 'seed'}``: where ``part`` is loaded from (see the module docstring)."""
    if part.source:
        source = os.fspath(ckpt_lib.absolute_path(part.source))
        return {"kind": source_kind(part, source), "source": source, "seed": -1}
    if init_from:
        workdir = ckpt_lib.resolve_step_dir(init_from).parent.parent  # <workdir>/checkpoints/<step>
        if (workdir / FROZEN_SUBDIR / part.name).exists():
            return {"kind": "workdir", "source": os.fspath(workdir), "seed": -1}
        record = _recorded(os.fspath(workdir), part.name)
        if record is not None:  # that run's own source: no chain of runs to keep around
            return {"kind": record["kind"], "source": record["source"], "seed": int(record.get("seed", -1))}
    return {"kind": "init", "source": "", "seed": int(seed)}


def load_parts(parts, abstract_extra: Mapping[str, Any], *, seed: int, init_from: str = "",
               records: Mapping[str, Mapping] | None = None) -> tuple[dict, dict]:
    """``({name: loaded tree}, {name: record})`` for ``parts``, placed as ``abstract_extra[name]``.

    ``records``: load each part from these recorded sources (a stored config's ``frozen``) instead
    of resolving ``part.source``. A record is ``{'kind', 'source', 'seed', 'dtype'}`` plus the
    ``fingerprint`` keys. Raises FileNotFoundError / ValueError naming the part's config field
    before anything is written.
    """
    values, out = {}, {}
    for part in parts:
        if part.name not in abstract_extra:
            raise ValueError(f"frozen part {part.name!r} is not an entry of the task's extra_vars "
                             f"{sorted(abstract_extra)}")
        where = dict(records[part.name]) if records is not None and part.name in records else \
            resolve(part, seed=seed, init_from=init_from)
        if where["kind"] == "init":
            logging.warning("%s is empty: the frozen part %r is random (seed %d); fine for tests and tiny runs, not "
                            "for real features", part.field, part.name, int(where["seed"]))
        target = _cast(part, abstract_extra[part.name])
        tree = _load(part, where["kind"], where["source"], where.get("seed"), target)
        values[part.name] = tree
        out[part.name] = {"kind": where["kind"], "source": where["source"], "seed": int(where.get("seed", -1)),
                          "dtype": part.dtype, **fingerprint(tree)}
        logging.info("frozen part %r: %s parameters (%.1f MB, %s) from %s", part.name,
                     f"{out[part.name]['parameters']:,}", out[part.name]["bytes"] / 1e6, part.dtype,
                     where["source"] or f"random init (seed {where.get('seed')})")
    return values, out


def check_unchanged(stored: Mapping[str, Mapping], loaded: Mapping[str, Mapping], *, allow: bool,
                    where: str) -> None:
    """Compares the records of a run's stored config (``stored``) with the ones just loaded.

    Raises ValueError naming every frozen part whose source, structure or content changed, unless
    ``allow`` (then each is logged as a warning). Parts the stored config has no record of (runs
    from before frozen parts were recorded) are accepted.
    """
    changed = []
    for name, new in loaded.items():
        old = stored.get(name)
        if old is None:
            continue
        diffs = [f"{k} {old.get(k)!r} → {new.get(k)!r}" for k in ("source", "structure", "content", "dtype")
                 if old.get(k) != new.get(k)]
        if diffs:
            changed.append(f"frozen part {name!r}: " + ", ".join(diffs))
    if not changed:
        return
    message = (f"the frozen parts changed since {where}:\n  " + "\n  ".join(changed))
    if allow:
        logging.warning("%s\n(train.allow_frozen_change=True: continuing with the new ones)", message)
        return
    raise ValueError(message + "\nset train.allow_frozen_change=True to continue with the new ones")


def write_copy(workdir: os.PathLike | str, name: str, tree, record: Mapping) -> str | None:
    """Writes ``<workdir>/frozen/<name>`` (params + the record as JSON) unless it exists; returns its
    path when written."""
    import orbax.checkpoint as ocp

    path = ckpt_lib.absolute_path(workdir) / FROZEN_SUBDIR / name
    if path.exists():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = ocp.CompositeCheckpointHandler(params=ocp.StandardCheckpointHandler(),
                                             record=ocp.JsonCheckpointHandler())
    with ocp.Checkpointer(handler) as writer:
        writer.save(path, args=ocp.args.Composite(params=ocp.args.StandardSave(tree),
                                                  record=ocp.args.JsonSave(dict(record))))
    logging.info("wrote a copy of the frozen part %r to %s", name, os.fspath(path))
    return os.fspath(path)

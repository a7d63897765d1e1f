"""The stored config is the run's identity: a resume compares the requested config with it.

``compare(stored, requested)`` flattens both JSON configs to dotted fields. Fields in
``MUTABLE_FIELDS`` (or below a prefix there) may change between starts — run length, logging,
checkpoint cadence and retention, sampling grids, the mesh (checkpoints restore onto any mesh), the
data loader's worker count — and each change is returned for logging. Every other field describes
the model, the data or the shapes, and must match: ``ConfigMismatchError`` lists each differing
field with its old and new value on one line. ``frozen.*`` is left out: the frozen parts' records
are compared by ``train.frozen.check_unchanged`` (with its own override). A field the stored config
lacks (added to the schema later) is compared with its default.
"""

from __future__ import annotations

import json
from typing import Any

MUTABLE_FIELDS = (
    "train.steps", "train.log_every", "train.sample_every", "train.checkpoint_every", "train.keep_last",
    "train.keep_every", "train.max_nonfinite_steps", "train.async_checkpoint", "train.allow_frozen_change",
    "train.frozen_copy", "train.init_from", "train.init_new", "data.worker_count", "mesh.", "sample.")
CHECKED_ELSEWHERE = ("frozen.",)
ABSENT = "(absent)"


class ConfigMismatchError(ValueError):
    """A resume asked for a different model, data or shapes than the workdir's run."""


def _matches(field: str, prefixes) -> bool:
    return any(field == p or (p.endswith(".") and field.startswith(p)) for p in prefixes)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{'a.b.c': value}`` of a JSON dict; lists are leaves (compared whole)."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _text(value: Any) -> str:
    return ABSENT if value is ABSENT else json.dumps(value)


def compare(stored: dict, requested: dict, *, defaults: dict | None = None) -> list[str]:
    """The changed mutable fields as ``'field: old -> new'`` lines; ``ConfigMismatchError`` naming
    every other differing field (``defaults``: the schema's JSON defaults, for fields the stored
    config lacks)."""
    old, new = flatten(stored), flatten(requested)
    base = flatten(defaults) if defaults else {}
    changed, mismatched = [], []
    for field in sorted(set(old) | set(new)):
        if _matches(field, CHECKED_ELSEWHERE):
            continue
        before = old.get(field, base.get(field, ABSENT))
        after = new.get(field, ABSENT)
        if before == after:
            continue
        line = f"{field}: {_text(before)} -> {_text(after)}"
        (changed if _matches(field, MUTABLE_FIELDS) else mismatched).append(line)
    if mismatched:
        raise ConfigMismatchError(
            f"the requested config differs from the run's stored config in {len(mismatched)} field(s) that fix "
            f"the model, the data or the shapes (old -> new): {'; '.join(mismatched)}; expected the same values "
            f"(only {', '.join(f.rstrip('.') + ('.*' if f.endswith('.') else '') for f in MUTABLE_FIELDS)} may "
            f"change on resume), or a new --workdir")
    return changed

"""Checksum manifests of checkpoint steps: ``<step>/checksums.json``, written once the step is committed.

``write(step_dir)`` records every file of the step (its path relative to the step, size and CRC-32,
read in 8 MiB chunks: about one pass at disk speed); ``damage(step_dir)`` re-reads them and returns
what no longer matches — a missing file, a changed size (truncated), a different checksum (flipped
bytes), an unlisted new file is ignored. ``newest_intact(root, steps)`` walks back from the newest
step. A step without a manifest (saved before manifests existed, or the process died between the
commit and the manifest) counts as intact, with a warning: there is nothing to check it against.

Orbax writes a step's files asynchronously and commits it by a rename; the manifest is written after
that (``train.checkpoint.Checkpointer`` does it for every committed step that lacks one before each
save, at ``wait()`` and at ``close()``), so it never describes a half-written step.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Iterable

from absl import logging
from etils import epath

MANIFEST = "checksums.json"
CHUNK = 8 << 20


class CheckpointDamagedError(ValueError):
    """A checkpoint step's files do not match its checksum manifest."""


def _files(step_dir: epath.Path) -> list[str]:
    """Every file below ``step_dir`` (relative paths), the manifest itself left out."""
    text = os.fspath(step_dir)
    if "://" in text:  # object stores: epath's walk
        found = [os.fspath(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file()]
    else:
        found = [os.path.relpath(os.path.join(root, n), text) for root, _, names in os.walk(text) for n in names]
    return sorted(f for f in found if f not in (MANIFEST, f".{MANIFEST}.tmp"))


def checksum(path: epath.Path) -> tuple[int, int]:
    """``(size, crc32)`` of one file, streamed."""
    crc, size = 0, 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, crc


def write(step_dir: os.PathLike | str) -> None:
    """Writes ``<step_dir>/checksums.json`` (atomically: a temporary file renamed)."""
    step_dir = epath.Path(step_dir)
    files = {name: list(checksum(step_dir / name)) for name in _files(step_dir)}
    tmp = step_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"algorithm": "crc32", "files": files}, indent=1))
    tmp.rename(step_dir / MANIFEST)


def has_manifest(step_dir: os.PathLike | str) -> bool:
    return (epath.Path(step_dir) / MANIFEST).exists()


def damage(step_dir: os.PathLike | str) -> list[str]:
    """What no longer matches the manifest of ``step_dir``, one ``'file: what'`` entry each ([] when
    intact or without a manifest)."""
    step_dir = epath.Path(step_dir)
    path = step_dir / MANIFEST
    if not path.exists():
        logging.warning("checkpoint %s has no checksum manifest (%s): it cannot be verified", os.fspath(step_dir),
                        MANIFEST)
        return []
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as error:
        return [f"{MANIFEST}: unreadable ({error})"]
    problems = []
    for name, (size, crc) in sorted(files.items()):
        file = step_dir / name
        if not file.exists():
            problems.append(f"{name}: missing")
            continue
        found_size, found_crc = checksum(file)
        if found_size != size:
            problems.append(f"{name}: {found_size} bytes, expected {size}")
        elif found_crc != crc:
            problems.append(f"{name}: checksum {found_crc:08x}, expected {crc:08x}")
    return problems


def newest_intact(root: os.PathLike | str, steps: Iterable[int]) -> int | None:
    """The newest of ``steps`` (directories ``<root>/<step>``) whose files match their manifest."""
    for step in sorted(steps, reverse=True):
        if not damage(epath.Path(root) / str(step)):
            return step
    return None


def verify_step(root: os.PathLike | str, step: int, steps: Iterable[int], *, hint: str = "") -> None:
    """Raises ``CheckpointDamagedError`` when step ``step`` under ``root`` is damaged: the message names
    each damaged file and the newest intact step among ``steps`` (``hint``: how to use it)."""
    step_dir = epath.Path(root) / str(step)
    problems = damage(step_dir)
    if not problems:
        return
    older = [s for s in steps if s < step]
    intact = newest_intact(root, older)
    fallback = (f"the newest intact step is {intact}" + (f" ({hint})" if hint else "")) if intact is not None \
        else "no older step is intact"
    raise CheckpointDamagedError(
        f"checkpoint step {step} in {os.fspath(root)} is damaged ({'; '.join(problems[:10])}"
        f"{f'; and {len(problems) - 10} more' if len(problems) > 10 else ''}): expected its files to match "
        f"{os.fspath(step_dir / MANIFEST)}; {fallback}")

"""starflow2_jax.atomic: every kind of output appears whole or not at all.

Each writer is run with a failure injected at each stage of the write — the serialiser or the file's
``write`` breaking half-way (an OSError, and a KeyboardInterrupt for the interrupted case), ``fsync``
failing, the final rename failing — once with no target and once over an existing target. Afterwards
the directory must hold exactly what it held before: no partial target, no temporary, and an existing
target byte-for-byte unchanged. Written files are read back with the format's own reader (json, numpy,
PIL) as the oracle.
"""

import builtins
import json
import os

import numpy as np
import pytest
from PIL import Image

from starflow2_jax import atomic

IMAGE = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 7
WRITERS = {
    "bytes": ("out.bin", lambda p: atomic.write_bytes(p, b"new bytes " * 1000)),
    "text": ("out.txt", lambda p: atomic.write_text(p, "new text\n" * 1000)),
    "json": ("out.json", lambda p: atomic.write_json(p, {"a": list(range(1000))})),
    "npz": ("out.npz", lambda p: atomic.write_npz(p, {"a": np.arange(1000), "b": np.ones((4, 5))})),
    "png": ("out.png", lambda p: atomic.write_png(p, np.tile(IMAGE, (50, 50, 1)))),
}


class _Boom(OSError):
    """The injected failure (an OSError, like a full disk)."""


class _HalfWriter:
    """Wraps a file: the first ``write`` writes half its data, then raises ``error``."""

    def __init__(self, file, error):
        self._file, self._error = file, error

    def write(self, data):
        self._file.write(data[: max(1, len(data) // 2)])
        self._file.flush()
        raise self._error

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def _inject(monkeypatch, stage: str):
    """Makes the next atomic write fail at ``stage``; returns the exception type to expect."""
    if stage in ("write", "interrupt"):
        error = _Boom("disk full") if stage == "write" else KeyboardInterrupt()

        def half_open(path, mode="r", *args, **kwargs):
            file = builtins.open(path, mode, *args, **kwargs)
            return _HalfWriter(file, error) if "w" in mode else file
        monkeypatch.setattr(atomic, "open", half_open, raising=False)
        return type(error)
    if stage == "fsync":
        def broken_fsync(fd):
            raise _Boom("fsync failed")
        monkeypatch.setattr(os, "fsync", broken_fsync)
        return _Boom
    if stage == "rename":
        def broken_replace(src, dst):
            raise _Boom("rename failed")
        monkeypatch.setattr(os, "replace", broken_replace)
        return _Boom
    raise AssertionError(stage)


def _listing(directory):
    """{relative path: bytes} of every file and '(dir)' for every directory below ``directory``."""
    found = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            found[os.path.relpath(os.path.join(root, name), directory)] = "(dir)"
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, directory)] = f.read()
    return found


@pytest.mark.parametrize("existing", [False, True], ids=["new", "over-existing"])
@pytest.mark.parametrize("stage", ["write", "interrupt", "fsync", "rename"])
@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_failed_file_write_leaves_the_directory_as_it_was(tmp_path, monkeypatch, kind, stage, existing):
    name, write = WRITERS[kind]
    target = tmp_path / "sub" / name
    if existing:
        target.parent.mkdir()
        target.write_bytes(b"the old, complete file")
    before = _listing(tmp_path)
    expected = _inject(monkeypatch, stage)
    with pytest.raises(expected):
        write(target)
    monkeypatch.undo()
    after = _listing(tmp_path)
    after.pop("sub", None)  # the parent directory may have been created before the failure
    before.pop("sub", None)
    assert after == before


def test_serialisers_failing_half_way_leave_nothing(tmp_path, monkeypatch):
    """The format's own writer breaking after it wrote part of the file (np.savez, PIL)."""
    (tmp_path / "old.npz").write_bytes(b"old npz")
    (tmp_path / "old.png").write_bytes(b"old png")
    before = _listing(tmp_path)

    def broken_savez(file, **arrays):
        file.write(b"PK partial zip")
        raise _Boom("savez failed")
    monkeypatch.setattr(np, "savez", broken_savez)
    for name in ("old.npz", "new.npz"):
        with pytest.raises(_Boom, match="savez failed"):
            atomic.write_npz(tmp_path / name, {"a": np.zeros(3)})

    def broken_save(self, fp, format=None, **kwargs):
        fp.write(b"\x89PNG partial")
        raise _Boom("encoder failed")
    monkeypatch.setattr(Image.Image, "save", broken_save)
    for name in ("old.png", "new.png"):
        with pytest.raises(_Boom, match="encoder failed"):
            atomic.write_png(tmp_path / name, IMAGE)
    assert _listing(tmp_path) == before


def test_unserialisable_json_and_nan_leave_nothing(tmp_path):
    (tmp_path / "m.json").write_text('{"old": 1}\n')
    with pytest.raises(TypeError, match="not JSON serializable"):
        atomic.write_json(tmp_path / "m.json", {"a": object()})
    with pytest.raises(ValueError, match="not JSON compliant"):
        atomic.write_json(tmp_path / "n.json", {"a": float("nan")})
    assert _listing(tmp_path) == {"m.json": b'{"old": 1}\n'}
    atomic.write_json(tmp_path / "n.json", {"a": float("nan")}, allow_nan=True)
    assert (tmp_path / "n.json").read_text() == '{\n  "a": NaN\n}\n'


@pytest.mark.parametrize("existing", [False, True], ids=["new", "over-existing"])
def test_files_round_trip_and_replace(tmp_path, existing):
    """Read back with json / numpy / PIL; an old file is replaced; no temporary remains."""
    paths = {}
    for kind, (name, write) in WRITERS.items():
        paths[kind] = tmp_path / "deep" / "er" / name
        if existing:
            paths[kind].parent.mkdir(parents=True, exist_ok=True)
            paths[kind].write_bytes(b"old")
        assert write(paths[kind]) == os.fspath(paths[kind])
    assert paths["bytes"].read_bytes() == b"new bytes " * 1000
    assert paths["text"].read_text() == "new text\n" * 1000
    assert json.loads(paths["json"].read_text()) == {"a": list(range(1000))}
    with np.load(paths["npz"]) as data:
        assert sorted(data.files) == ["a", "b"]
        np.testing.assert_array_equal(data["a"], np.arange(1000))
    with Image.open(paths["png"]) as image:
        np.testing.assert_array_equal(np.asarray(image), np.tile(IMAGE, (50, 50, 1)))
    assert sorted(os.listdir(tmp_path / "deep" / "er")) == sorted(name for name, _ in WRITERS.values())
    atomic.write_png(tmp_path / "grey.png", IMAGE[..., :1])
    with Image.open(tmp_path / "grey.png") as image:
        assert image.mode == "L"
        np.testing.assert_array_equal(np.asarray(image), IMAGE[..., 0])


def test_output_path_for_writers_that_need_a_name(tmp_path):
    with atomic.output_path(tmp_path / "w.npz") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".w.npz.") and tmp.suffix == ".npz"
        np.savez(tmp, a=np.arange(3))  # np.savez appends .npz to names without it: the suffix is kept
    assert os.listdir(tmp_path) == ["w.npz"]
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic.output_path(tmp_path / "empty.bin"):
            pass
    assert os.listdir(tmp_path) == ["w.npz"]


def test_bad_arguments_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"'x\.txt' must end in \.npz"):
        atomic.write_npz("x.txt", {})
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 1\|3\).*float32 \(2, 2, 1\)"):
        atomic.write_png(tmp_path / "x.png", np.zeros((2, 2, 1), np.float32))
    with pytest.raises(ValueError, match="mode 'a'"):
        with atomic.output_file(tmp_path / "x.txt", "a"):
            pass
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match="a directory of that name exists"):
        atomic.write_text(tmp_path / "d", "x")
    assert _listing(tmp_path) == {"d": "(dir)"}


# ---- directories ---------------------------------------------------------------------------------
def _fill(directory):
    (directory / "a.json").write_text("{}")
    (directory / "nested").mkdir()
    (directory / "nested" / "b.bin").write_bytes(b"b" * 100)


def test_output_directory_appears_whole(tmp_path):
    out = tmp_path / "x" / "export"
    with atomic.output_directory(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".export.")
        assert not out.exists()  # invisible until complete
        _fill(tmp)
    assert _listing(tmp_path / "x") == {"export": "(dir)", "export/a.json": b"{}",
                                        "export/nested": "(dir)", "export/nested/b.bin": b"b" * 100}
    (tmp_path / "empty").mkdir()  # an existing empty directory is a valid target
    with atomic.output_directory(tmp_path / "empty") as tmp:
        _fill(tmp)
    assert sorted(os.listdir(tmp_path / "empty")) == ["a.json", "nested"]


@pytest.mark.parametrize("existing", [False, True], ids=["new", "over-empty"])
@pytest.mark.parametrize("stage", ["body", "interrupt", "fsync", "rename"])
def test_failed_directory_write_leaves_nothing(tmp_path, monkeypatch, stage, existing):
    out = tmp_path / "export"
    if existing:
        out.mkdir()
    before = _listing(tmp_path)
    if stage in ("fsync", "rename"):
        expected = _inject(monkeypatch, stage)
    else:
        expected = _Boom if stage == "body" else KeyboardInterrupt
    with pytest.raises(expected):
        with atomic.output_directory(out) as tmp:
            _fill(tmp)
            if stage == "body":
                raise _Boom("the exporter failed half-way")
            if stage == "interrupt":
                raise KeyboardInterrupt
    monkeypatch.undo()
    assert _listing(tmp_path) == before


def test_output_directory_refuses_a_full_target(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "keep.txt").write_text("keep")
    (tmp_path / "file").write_text("a file")
    for target in ("export", "file"):
        with pytest.raises(FileExistsError, match=f"{target} exists and is not an empty directory"):
            with atomic.output_directory(tmp_path / target):
                pass
    assert _listing(tmp_path) == {"export": "(dir)", "export/keep.txt": b"keep", "file": b"a file"}

    # something appears in the target while the directory is being written: refused, nothing lost
    with pytest.raises(FileExistsError, match="empty2 exists and is not an empty directory"):
        with atomic.output_directory(tmp_path / "empty2") as tmp:
            _fill(tmp)
            (tmp_path / "empty2").mkdir()
            (tmp_path / "empty2" / "late.txt").write_text("late")
    assert _listing(tmp_path / "empty2") == {"late.txt": b"late"}
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]

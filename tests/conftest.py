"""Test-wide setup: 8 fake CPU devices (set before JAX is imported) and the reference fixtures."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

_DEVICE_FLAG = "--xla_force_host_platform_device_count=8"

# XLA reads these once, when the backend starts; they must be set before any test imports jax.
if "jax" in sys.modules:
    raise RuntimeError(
        "jax was imported before tests/conftest.py could set XLA_FLAGS/JAX_PLATFORMS; "
        "the suite needs 8 fake CPU devices (remove the early import, e.g. from a pytest plugin)"
    )
_xla_flags = [
    flag
    for flag in os.environ.get("XLA_FLAGS", "").split()
    if not flag.startswith("--xla_force_host_platform_device_count=")
]
os.environ["XLA_FLAGS"] = " ".join([*_xla_flags, _DEVICE_FLAG])
os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np  # noqa: E402  (after the environment above)
import pytest  # noqa: E402
from absl import flags  # noqa: E402

# `--dist loadgroup` with pytest-xdist 3.8's crash recovery fixed (a crashed worker hung the run)
from xdist_scheduling import pytest_xdist_make_scheduler  # noqa: E402,F401  (a hook: pytest finds it here)

# grain's multiprocessing workers read absl flags; outside absl.app.run they must be marked parsed.
flags.FLAGS.mark_as_parsed()

_REFERENCE_ENV = "STARFLOW2_REFERENCE_DIR"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Returns the directory with the PyTorch reference fixtures (`apple_*_tiny.npz`).

    `$STARFLOW2_REFERENCE_DIR` if set, else `shared/reference` beside the repository. A missing
    directory fails the test: the numerical oracle is never optional.
    """
    override = os.environ.get(_REFERENCE_ENV)
    if override:
        path = Path(override).expanduser().resolve()
        source = f"${_REFERENCE_ENV}"
    else:
        path = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
        source = "the default location (../shared/reference beside the repository)"
    if not path.is_dir():
        pytest.fail(
            f"reference fixtures directory {path} (from {source}) does not exist; "
            f"set {_REFERENCE_ENV} to the directory holding apple_tarflow_tiny.npz",
            pytrace=False,
        )
    return path


def _load_npz(directory: Path, name: str) -> dict[str, np.ndarray]:
    path = directory / name
    if not path.is_file():
        pytest.fail(f"reference fixture {path} is missing", pytrace=False)
    with np.load(path) as data:
        return dict(data)


@pytest.fixture(scope="session")
def tarflow_fixture(reference_dir: Path) -> dict[str, np.ndarray]:
    """Returns every array of `apple_tarflow_tiny.npz` (ml-tarflow reference), keyed as in the file."""
    return _load_npz(reference_dir, "apple_tarflow_tiny.npz")


@pytest.fixture(scope="session")
def starflow_fixture(reference_dir: Path) -> dict[str, np.ndarray]:
    """Returns every array of `apple_starflow_tiny.npz` (ml-starflow reference), keyed as in the file."""
    return _load_npz(reference_dir, "apple_starflow_tiny.npz")


# ---- compiled code is freed after every test module --------------------------------------------------
# Every XLA:CPU executable keeps its machine code in a few memory maps of its own until it is freed, and
# jax keeps every executable it compiled in its caches. A worker that runs half the suite compiles tens
# of thousands of them and reaches the kernel's limit on maps per process (vm.max_map_count, 65530);
# the next compile then fails to map its code and aborts the worker ("Fatal Python error: Aborted" in
# XLA's compiler, seen in CI at stop 11 and again here: a worker held 58,661 maps near the end of the
# suite). Clearing jax's caches after each module keeps a worker's maps near those of one module.
@pytest.fixture(autouse=True, scope="module")
def _free_compiled_code():
    yield
    if "jax" in sys.modules:
        import jax

        jax.clear_caches()
        gc.collect()


# ---- measured numbers in the run's summary ---------------------------------------------------------
# A test that measures something worth reading (e.g. how much training lowered an error) records it
# with ``record_property("summary", "text")``. Properties travel with the test reports, also from
# pytest-xdist workers, so the controller prints them at the end of every run, passed or not.
_SUMMARIES: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    if report.when == "call":
        _SUMMARIES.extend((report.nodeid, str(v)) for k, v in report.user_properties if k == "summary")


def pytest_terminal_summary(terminalreporter):
    if _SUMMARIES:
        terminalreporter.section("measured")
        for nodeid, text in _SUMMARIES:
            terminalreporter.write_line(f"{nodeid}: {text}")


# ---- the digits demo's runlocal chain, shared by tests/train and tests/eval (built once per session) ----
from demo_chain import demo_chain  # noqa: E402,F401  (a fixture; jax is imported inside it, after the setup above)

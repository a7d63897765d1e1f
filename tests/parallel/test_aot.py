"""`starflow2 aot` and `parallel.aot`: real TPU ahead-of-time compiles on this CPU machine (libtpu).

The compiles run in subprocesses (libtpu is loaded there, never in the pytest process, which keeps
its 8 fake CPU devices). Oracles: hand-counted matmul FLOPs, the chip table's published figures, the
arguments' shard sizes computed from the parameter count, and the TPU compiler's own refusal.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from starflow2_jax.parallel import aot

ROOT = Path(__file__).resolve().parents[2]
HAS_LIBTPU = __import__("importlib").util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install 'starflow2-jax[tpu]')")


def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1", PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    return env


def _aot(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "starflow2_jax.cli", "aot", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_matmul_flops_scales_scan_bodies_by_their_trip_count():
    w = jax.ShapeDtypeStruct((5, 8, 8), jnp.float32)  # 5 stacked (8, 8) layers
    x = jax.ShapeDtypeStruct((3, 8), jnp.float32)

    def stack(w, x):
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]

    assert aot.matmul_flops(stack, w, x) == 5 * 2 * 3 * 8 * 8
    # the gradient: forward (1 matmul) + backward (2 matmuls) per layer
    grad = jax.grad(lambda w, x: stack(w, x).sum())
    assert aot.matmul_flops(grad, w, x) == 3 * 5 * 2 * 3 * 8 * 8


def test_topology_names_are_checked():
    assert aot.parse_topology("v5p:4x4x4") == ("v5p", (4, 4, 4))
    with pytest.raises(aot.AotError, match="'v9z:2x2'.*GENERATION"):
        aot.parse_topology("v9z:2x2")
    with pytest.raises(aot.AotError, match="'v5p:2xx2'"):
        aot.parse_topology("v5p:2xx2")
    assert aot.CHIPS["v5p"].device_hbm_bytes == 95 * 2**30 and aot.CHIPS["v4"].device_peak_flops == 137.5e12


@needs_libtpu
@pytest.mark.slow
def test_aot_tiny_config_on_v5p_2x2x1_reports_memory_and_flops():
    result = _aot("--config", "configs/demo.py:runlocal", "--topology", "v5p:2x2x1", "--json", "--mfu", "0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report["devices"], report["chips"], report["device_kind"]) == (4, 4, "TPU v5")
    assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1} and report["fits"] is True
    train = report["train_step"]
    memory = train["memory"]
    # data parallel: every device holds the whole float32 state: params + 2 Adam moments + EMA
    assert memory["argument_size_in_bytes"] >= 4 * 4 * report["params"]
    assert 0 < memory["peak_memory_in_bytes"] <= train["hbm_bytes"] == 95 * 2**30
    assert train["matmul_flops_per_device"] == train["matmul_flops"] / 4
    assert train["step_seconds_at_mfu"] == pytest.approx(train["matmul_flops"] / 4 / (0.5 * 459e12))
    assert train["xla_flops"] > 0
    assert report["sample_step"]["fits"] is True and report["sample_step"]["matmul_flops"] > 0


@needs_libtpu
@pytest.mark.slow
def test_aot_config_that_does_not_fit_reports_numbers_and_exits_1():
    width = 16384  # two layers of width 16384, data-parallel: ~3G params replicated on a 16 GiB v5e
    result = _aot("--config", "configs/demo.py:runlocal", "--topology", "v5e:2x2", "--no-sample",
                  f"--config.model.flow.kwargs.channels={width}",
                  f"--config.model.flow.kwargs.top_block_channels={width}")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "DOES NOT FIT" in result.stdout and "16 GiB HBM" in result.stdout
    assert "does not fit on 1 x v5e:2x2" in result.stderr
    assert "matmul FLOPs" in result.stdout


@needs_libtpu
def test_aot_unknown_topology_and_bad_mesh_are_clear_errors():
    result = _aot("--config", "configs/demo.py:runlocal", "--topology", "v5p:3x3x7")
    assert result.returncode == 2
    assert "--topology 'v5p:3x3x7': libtpu does not know this topology" in result.stderr
    result = _aot("--config", "configs/demo.py:runlocal", "--topology", "v5p:2x2x1", "--config.mesh.data=3")
    assert result.returncode == 2
    assert "does not match the 4 devices" in result.stderr


@needs_libtpu
def test_multislice_mesh_puts_the_data_axis_across_slices():
    script = textwrap.dedent("""
        import os
        os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
        from starflow2_jax import parallel
        from starflow2_jax.parallel import aot
        devices = aot.topology_devices("v5p:2x2x1", num_slices=2)
        mesh = parallel.make_mesh({"data": 4, "fsdp": 2}, devices)
        slices = [[d.slice_index for d in row.flat] for row in mesh.devices]
        print(slices)
        try:
            parallel.make_mesh({"data": 1, "fsdp": 8}, devices)
        except ValueError as error:
            print("ERROR", error)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == str([[0, 0], [0, 0], [1, 1], [1, 1]])  # data rows 0-1 on slice 0, 2-3 on slice 1
    assert "span 2 TPU slices" in lines[1] and "multiple of 2" in lines[1]

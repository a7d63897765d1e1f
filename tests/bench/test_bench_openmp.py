"""The benchmarks put PyTorch's OpenMP threads to sleep between calls (``common.passive_openmp``).

Oracle: libgomp itself. With ``OMP_DISPLAY_ENV=VERBOSE`` it prints the settings it read when it was
loaded; ``GOMP_SPINCOUNT = '0'`` means passive waiting (its default, OMP_WAIT_POLICY unset, spins
300000 times; its OMP_WAIT_POLICY line reads 'PASSIVE' either way, so the spin count is what tells).
Each case runs in a fresh interpreter, since libgomp reads the environment once per process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from starflow2_jax.bench import common

ROOT = Path(__file__).resolve().parents[2]


def _libgomp_after(code: str, **env_overrides) -> tuple[dict, dict]:
    """Runs ``code`` (which prints one JSON line last) then ``import torch`` in a fresh interpreter;
    returns (that JSON, libgomp's displayed settings {NAME: value})."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(PYTHONPATH=str(ROOT), OMP_DISPLAY_ENV="VERBOSE", JAX_PLATFORMS="cpu", **env_overrides)
    out = subprocess.run([sys.executable, "-c", code + "\nimport torch\n"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    shown = dict(re.findall(r"^\s*(\w+) = '([^']*)'", out.stdout + out.stderr, flags=re.M))
    assert "GOMP_SPINCOUNT" in shown, (out.stdout + out.stderr)[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), shown


_SET_POLICY = ("import json\nfrom starflow2_jax.bench import common\n"
               "print(json.dumps(common.passive_openmp()), flush=True)")


def test_sets_passive_before_torch_loads():
    record, shown = _libgomp_after(_SET_POLICY)
    assert record == {"omp_wait_policy": "PASSIVE", "omp_wait_policy_source": "bench"}
    assert shown["GOMP_SPINCOUNT"] == "0"


def test_the_users_policy_wins():
    record, shown = _libgomp_after(_SET_POLICY, OMP_WAIT_POLICY="ACTIVE")
    assert record == {"omp_wait_policy": "ACTIVE", "omp_wait_policy_source": "environment"}
    assert shown["OMP_WAIT_POLICY"] == "ACTIVE" and shown["GOMP_SPINCOUNT"] != "0"


def test_too_late_once_torch_is_loaded(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setitem(sys.modules, "torch", sys.modules.get("torch") or object())
    assert common.passive_openmp() == {"omp_wait_policy": None, "omp_wait_policy_source": "unset"}
    assert "OMP_WAIT_POLICY" not in os.environ


@pytest.mark.slow
def test_flow_bench_sets_it_before_its_torch_side():
    """The flow bench's own path (run → torch_ref, matmul peak) loads torch after setting the policy."""
    code = ("import json, sys\nfrom starflow2_jax.bench import flow\n"
            "r = flow.run('tiny', steps=1, repeats=1, skip_sampling=True)\n"
            "assert 'torch' in sys.modules\n"
            "print(json.dumps({k: r[k] for k in ('omp_wait_policy', 'omp_wait_policy_source', 'train_vs_torch')}))")
    record, shown = _libgomp_after(code)
    assert (record["omp_wait_policy"], record["omp_wait_policy_source"]) == ("PASSIVE", "bench")
    assert record["train_vs_torch"] > 0
    assert shown["GOMP_SPINCOUNT"] == "0"

"""`launch/local.sh demo --flow` (the flow-only digits demo) end to end (data → train → sample → bpd → judge →
report) with the tiny `configs/demo.py:runlocal` preset, as a subprocess in the repository's .venv.
(`launch/local.sh demo`, the STARFlow2 demo: test_starflow2_demo_pipeline.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
LOCAL_SH = REPO / "launch" / "local.sh"


def _user_env(**extra: str) -> dict[str, str]:
    """The environment a user's shell would have: without the suite's 8 fake devices."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTEST_XDIST_WORKER")}
    env.update(extra)
    return env


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "starflow2").exists() or Path(sys.prefix).resolve() != (REPO / ".venv").resolve(),
                    reason="needs the suite to run in the repository's .venv (launch/local.sh test)")
def test_local_demo_produces_report_and_files(tmp_path):
    workdir = tmp_path / "demo"
    result = subprocess.run(["bash", str(LOCAL_SH), "demo", "--flow", "--workdir", str(workdir)], cwd=tmp_path,
                            env=_user_env(STARFLOW2_DEMO_CONFIG="configs/demo.py:runlocal"),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "held-out bits/dim" in result.stdout and "demo finished in" in result.stdout
    assert f"report        {workdir}/report.html" in result.stdout

    for name in ("report.html", "demo_metrics.json", "bpd.json", "config.json", "metrics.jsonl"):
        assert (workdir / name).is_file(), name
    for g in (0, 2):
        assert (workdir / f"samples_cfg{g}.png").is_file()
        with np.load(workdir / f"samples_cfg{g}.npz") as npz:
            assert npz["samples"].shape == (100, 8, 8, 1)
            np.testing.assert_array_equal(npz["labels"], np.repeat(np.arange(10), 10))
            assert float(npz["guidance"]) == g
    metrics = json.loads((workdir / "demo_metrics.json").read_text())
    assert [e["guidance"] for e in metrics["guidance"]] == [0.0, 1.0, 2.0]
    assert all(e["judge"]["num_samples"] == 1000 for e in metrics["guidance"])
    assert metrics["steps"] == 4 and not metrics["resumed"]
    assert set(metrics["timings"]) >= {"setup", "data", "train", "bpd"}
    assert metrics["bpd"] == json.loads((workdir / "bpd.json").read_text())["bits_per_dim"]
    assert not [p for p in workdir.rglob("*") if ".tmp" in p.name or p.name.endswith(".partial")]  # no temporaries

    # a second run resumes (nothing left to train) and scores again
    again = subprocess.run(["bash", str(LOCAL_SH), "demo", "--workdir", str(workdir), "--flow"], cwd=tmp_path,
                           env=_user_env(STARFLOW2_DEMO_CONFIG="configs/demo.py:runlocal"),
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resuming from step 4" in again.stderr
    assert json.loads((workdir / "demo_metrics.json").read_text())["resumed"] is True

    # the STARFlow2 demo refuses this workdir, naming it and what it holds, and writes nothing
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    refused = subprocess.run(["bash", str(LOCAL_SH), "demo", "--workdir", str(workdir)], cwd=tmp_path,
                             env=_user_env(STARFLOW2_DEMO_SIZE="runlocal"), capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert f"demo --workdir {workdir}: it holds a flow-only digits demo" in refused.stderr, refused.stderr
    assert "launch/local.sh demo --flow --workdir DIR" in refused.stderr
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before


@pytest.mark.parametrize("argv", [["demo", "--bogus"], ["demo", "--flow", "--bogus"]])
def test_local_demo_rejects_unknown_arguments(argv):
    result = subprocess.run(["bash", str(LOCAL_SH), *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "unknown argument '--bogus' (usage: launch/local.sh demo [--flow] [--workdir DIR])" in result.stderr

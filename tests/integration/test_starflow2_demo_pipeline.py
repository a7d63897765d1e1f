"""`launch/local.sh demo` — the STARFlow2 digits demo's orchestration — at the runlocal size
(``STARFLOW2_DEMO_SIZE=runlocal``: a few steps per stage), as a subprocess in the repository's .venv
with a user's environment (1 CPU device).

One pipeline is shared by the slow tests (``demo``): a new demo stopped after stage 1
(``STARFLOW2_DEMO_STOP_AFTER``), then a run whose stage 2 is long (``STARFLOW2_DEMO_TRAIN_ARGS``) and gets
SIGTERM once it is stepping, then a rerun that resumes it. Oracles: the files each stage leaves (its
checkpoint steps, metrics.jsonl, train_summary.json, the stored config), the `starflow2 train` start lines
(which stages ran, and from where), and before/after snapshots of the directories a run must not touch.
While ``starflow2_jax.eval.starflow2_demo`` (the scoring) is not in the package, the runs stop after
stage 3 instead of scoring; once it is, they go through it and its report and metrics must appear.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from demo_chain import json_numbers

REPO = Path(__file__).resolve().parents[2]
LOCAL_SH = REPO / "launch" / "local.sh"
KIND = "starflow2-digits-demo"
STAGES = ("stage0", "stage1", "stage2", "stage3")
CONFIGS = {"stage0": "configs/lm.py:demo,runlocal", "stage1": "configs/starflow2.py:demo,stage1,runlocal",
           "stage2": "configs/starflow2.py:demo,stage2,runlocal", "stage3": "configs/starflow2.py:demo,stage3,runlocal"}
# stage 2 of the stopped run: long enough to be stepping when SIGTERM comes, one checkpoint (SIGTERM's)
LONG = "--config.train.steps=100000 --config.train.checkpoint_every=0 --config.train.log_every=1"

needs_venv = pytest.mark.skipif(
    not (REPO / ".venv" / "bin" / "starflow2").exists() or Path(sys.prefix).resolve() != (REPO / ".venv").resolve(),
    reason="needs the suite to run in the repository's .venv (launch/local.sh test)")


def _user_env(**extra: str) -> dict[str, str]:
    """The environment a user's shell would have (without the suite's 8 fake devices), runlocal size."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "PYTEST_XDIST_WORKER") and not k.startswith("STARFLOW2_DEMO_")}
    env["STARFLOW2_DEMO_SIZE"] = "runlocal"
    env.update(extra)
    return env


def _demo(workdir: Path, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LOCAL_SH), "demo", "--workdir", str(workdir)], cwd=cwd, env=_user_env(**env),
                          capture_output=True, text=True, timeout=900)


def _snapshot(directory: Path) -> dict[str, str]:
    """``{relative path: sha256 and mtime}`` of every file below ``directory`` (directories as '<dir>')."""
    out = {}
    for path in sorted(directory.rglob("*")):
        rel = os.fspath(path.relative_to(directory))
        if path.is_dir():
            out[rel] = "<dir>"
        else:
            out[rel] = f"{hashlib.sha256(path.read_bytes()).hexdigest()} {path.stat().st_mtime_ns}"
    return out


def _train_starts(stderr: str) -> dict[str, str]:
    """``{stage: how it started}`` from the `starflow2 train` start lines of a demo's stderr."""
    starts = {}
    for config, how in re.findall(r"^starflow2 train: (\S+), \d+ steps, (.*)$", stderr, re.MULTILINE):
        stage = [name for name, spec in CONFIGS.items() if spec == config]
        assert stage, config
        starts[stage[0]] = how
    return starts


def _metric_steps(workdir: Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def _temporaries(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if ".tmp" in p.name or p.name.endswith(".partial")]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The shared pipeline: ``first`` (a new demo, STARFLOW2_DEMO_STOP_AFTER=stage1), ``stopped`` (stage 2
    long, SIGTERM to local.sh once it logged 2 steps), ``step`` (stage 2's checkpoint), ``earlier`` (the
    snapshots of stage0, stage0_hf and stage1 before the SIGTERM), ``after_stop`` (the listings of the demo's
    and stage 2's directories after it), ``resumed`` (the rerun, stage 2 to ``step`` + 2)."""
    root = tmp_path_factory.mktemp("starflow2_demo")
    workdir = root / "demo"
    first = _demo(workdir, root, STARFLOW2_DEMO_STOP_AFTER="stage1")
    assert first.returncode == 0, first.stderr[-4000:]

    process = subprocess.Popen(["bash", str(LOCAL_SH), "demo", "--workdir", str(workdir)], cwd=root,
                               env=_user_env(STARFLOW2_DEMO_TRAIN_ARGS=LONG), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while len(_metric_steps(workdir / "stage2")) < 2:  # stepping (its SIGTERM handler is in place)
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "stage 2 never started stepping"
            time.sleep(0.1)
        earlier = {name: _snapshot(workdir / name) for name in ("stage0", "stage0_hf", "stage1")}
        process.send_signal(signal.SIGTERM)  # to local.sh only, as `kill PID` would
        stdout, stderr = process.communicate(timeout=300)
    finally:  # a failure above must not leave local.sh's `starflow2 train` running: kill the whole group
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    stopped = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    saved = sorted(int(p.name) for p in (workdir / "stage2" / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1, (saved, stderr[-4000:])  # checkpoint_every=0: the one SIGTERM wrote
    step = saved[0]
    after_stop = {"demo": sorted(os.listdir(workdir)), "stage2": sorted(os.listdir(workdir / "stage2"))}

    resumed = _demo(workdir, root,
                    STARFLOW2_DEMO_TRAIN_ARGS=f"--config.train.steps={step + 2} --config.train.log_every=1")
    return SimpleNamespace(root=root, workdir=workdir, first=first, stopped=stopped, step=step, earlier=earlier,
                           after_stop=after_stop, resumed=resumed)


@needs_venv
@pytest.mark.slow
@pytest.mark.xdist_group("starflow2_demo")
def test_a_new_demo_writes_its_manifest_then_trains_stage0_exports_it_and_trains_stage1(demo):
    workdir, first = demo.workdir, demo.first
    manifest = json.loads((workdir / "demo.json").read_text())
    assert manifest["kind"] == KIND and manifest["size"] == "runlocal" and manifest["configs"] == CONFIGS
    assert f"a new STARFlow2 digits demo (size runlocal) in {workdir}" in first.stderr
    assert _train_starts(first.stderr) == {"stage0": "starting from scratch", "stage1": "starting from scratch"}
    # the corpus line the demo prints (from the export's tokenizer) says what stage 0's trainer logged
    shown = re.search(r"^\[local.sh\] demo corpus: (\d+) documents \(.*\), (\d+) images \(real training digits, "
                      r"drawn anew each epoch, read by the vision tower\), (\d+) tokens \((\d+) of text\), .*; "
                      r"vocabulary (\d+) tokens$", first.stderr, re.MULTILINE)
    logged = json.loads(re.search(r"\] corpus: (\{.*\})$", first.stderr, re.MULTILINE)[1])
    assert shown, first.stderr[-4000:]
    assert [int(x) for x in shown.groups()] == [logged[k] for k in ("documents", "images", "tokens", "text_tokens",
                                                                    "vocab_size")]
    assert logged["documents"] == 4000
    assert (workdir / "stage0_hf" / "config.json").is_file()
    for stage in ("stage0", "stage1"):
        summary = json.loads((workdir / stage / "train_summary.json").read_text())
        assert summary["step"] == 4 and summary["interrupted"] is False and summary["wall_seconds"] > 0
        assert summary["workdir"] == os.fspath(workdir / stage)
    stored = json.loads((workdir / "stage1" / "config.json").read_text())
    assert stored["frozen"]["vlm"]["source"] == os.fspath(workdir / "stage0_hf")  # the export is the frozen VLM
    assert stored["data"]["data_dir"] == os.fspath(workdir / "data")
    assert "stopped after stage1 (STARFLOW2_DEMO_STOP_AFTER)" in first.stderr


@needs_venv
@pytest.mark.slow
@pytest.mark.xdist_group("starflow2_demo")
def test_sigterm_stops_the_running_stage_and_a_rerun_resumes_it_from_its_checkpoint(demo):
    workdir, stopped, resumed, step = demo.workdir, demo.stopped, demo.resumed, demo.step
    # the stopped run: stages 0 and 1 skipped, stage 2 started from stage 1, stopped, named
    assert stopped.returncode == 143, stopped.stderr[-4000:]
    assert _train_starts(stopped.stderr) == {"stage2": f"starting from the params of {workdir / 'stage1'}"}
    for stage in ("stage0", "stage1"):
        assert re.search(rf"demo: {stage} finished earlier \(step 4, [\d.]+ s; .*\): skipped", stopped.stderr)
    assert "stopped by SIGTERM in stage2; run the same command again to resume" in stopped.stderr
    assert step >= 2
    assert demo.after_stop == {"demo": ["data", "demo.json", "stage0", "stage0_hf", "stage1", "stage2"],
                               "stage2": ["checkpoints", "config.json", "logs", "metrics.jsonl"]}  # no train_summary

    # the rerun: only stages 2 (from its checkpoint) and 3 (from stage 2) start
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert _train_starts(resumed.stderr) == {"stage2": f"resuming from step {step}",
                                             "stage3": f"starting from the params of {workdir / 'stage2'}"}
    steps = _metric_steps(workdir / "stage2")
    assert steps == list(range(1, step + 3)), steps  # logged once each: continued from the checkpoint, none redone
    for stage in ("stage2", "stage3"):
        summary = json.loads((workdir / stage / "train_summary.json").read_text())
        assert summary["step"] == step + 2 and summary["interrupted"] is False
    assert {name: _snapshot(workdir / name) for name in demo.earlier} == demo.earlier  # not rerun, not touched
    assert not _temporaries(workdir)
    assert (workdir / "report.html").is_file() and (workdir / "demo_metrics.json").is_file()
    assert f"report        {workdir}/report.html" in resumed.stdout


@needs_venv
@pytest.mark.slow
@pytest.mark.xdist_group("starflow2_demo")
def test_a_finished_demo_reruns_only_the_scoring(demo):
    workdir = demo.workdir
    stages = {name: _snapshot(workdir / name) for name in (*STAGES, "stage0_hf")}
    again = _demo(workdir, demo.root)
    assert again.returncode == 0, again.stderr[-4000:]
    assert _train_starts(again.stderr) == {}  # no `starflow2 train` started
    assert "starflow2 train --config" not in again.stderr and "convert to-hf" not in again.stderr
    for stage in STAGES:
        assert re.search(rf"demo: {stage} finished earlier \(step \d+, [\d.]+ s; .*\): skipped", again.stderr), stage
    assert f"demo: export {workdir / 'stage0_hf'} exists: skipped" in again.stderr
    assert {name: _snapshot(workdir / name) for name in stages} == stages
    assert "demo: scoring" in again.stderr and "demo finished in" in again.stdout
    assert f"metrics       {workdir}/demo_metrics.json" in again.stdout
    # the report of the whole pipeline: every section, every number finite, a verdict per target
    from starflow2_jax.eval.starflow2_demo import TARGETS
    from starflow2_jax.eval.starflow2_report import SECTIONS

    metrics = json.loads((workdir / "demo_metrics.json").read_text())
    assert set(metrics["checks"]) == set(TARGETS)
    bad = [(path, value) for path, value in json_numbers(metrics) if not math.isfinite(value)]
    assert not bad, bad
    page = (workdir / "report.html").read_text()
    assert all(f'<h2 id="{section}">' in page for section in SECTIONS)
    for line in ("text → image accuracy", "held-out bits/dim", "understanding accuracy", "interleaved structure",
                 "next-digit accuracy", "cache difference", "whole demo"):
        assert re.search(rf"^{line} .*(met|MISSED|n/a)\)", again.stdout, flags=re.M), line


@needs_venv
@pytest.mark.slow
@pytest.mark.xdist_group("starflow2_demo")
def test_a_starflow2_train_workdir_is_refused_before_anything_is_written(demo):
    stage = demo.workdir / "stage1"  # a real `starflow2 train` workdir
    before = _snapshot(stage)
    result = _demo(stage, demo.root)
    assert result.returncode == 2
    assert (f"demo --workdir {stage}: it holds a `starflow2 train` run of model.family 'starflow2' (config.json, "
            f"checkpoints, metrics.jsonl)") in result.stderr, result.stderr
    assert _snapshot(stage) == before


def _flow_demo_like(path: Path) -> None:
    """The files a flow-only demo leaves (launch/local.sh demo --flow; test_local_demo.py checks them)."""
    (path / "checkpoints" / "4").mkdir(parents=True)
    (path / "checkpoints" / "4" / "_CHECKPOINT_METADATA").write_text("{}")
    (path / "config.json").write_text(json.dumps({"model": {"family": "flow"}}))
    for name in ("metrics.jsonl", "bpd.json", "report.html", "demo_metrics.json", "samples_cfg0.png"):
        (path / name).write_text("{}")


def _train_like(path: Path) -> None:
    (path / "checkpoints").mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model": {"family": "lm"}}))


@needs_venv
@pytest.mark.parametrize("make,found", [
    (_flow_demo_like, re.escape("it holds a flow-only digits demo (bpd.json, samples_cfg*); ") + ".* Nothing was "
                      "written; resume it with `launch/local.sh demo --flow --workdir DIR`"),
    (_train_like, r"it holds a `starflow2 train` run of model.family 'lm' \(config.json, checkpoints\)"),
    (lambda p: (p / "notes.txt").write_text("mine"), r"it holds 1 entry and no demo.json \(notes.txt\)"),
    (lambda p: (p / ".hidden").write_text(""), r"it holds 1 entry and no demo.json \(.hidden\)"),
    (lambda p: (p / "demo.json").write_text(json.dumps({"kind": "other"})),
     r"its demo.json is of kind 'other', not 'starflow2-digits-demo'"),
    (lambda p: (p / "demo.json").write_text("{not json"), r"its demo.json is not readable JSON"),
    (lambda p: (p / "demo.json").write_text(json.dumps({"kind": KIND, "size": "demo"})),
     r"it holds a STARFlow2 digits demo of size 'demo' \(demo.json\), not 'runlocal'; .* set STARFLOW2_DEMO_SIZE=demo "
     r"to resume it"),
], ids=["flow_demo", "train_workdir", "stray_file", "hidden_file", "other_kind", "bad_manifest", "other_size"])
def test_a_workdir_holding_something_else_is_refused_before_anything_is_written(tmp_path, make, found):
    workdir = tmp_path / "demo"
    workdir.mkdir()
    make(workdir)
    before = _snapshot(tmp_path)
    result = _demo(workdir, tmp_path)
    assert result.returncode == 2, result.stderr
    assert re.search(rf"\[local.sh\] error: demo --workdir {re.escape(str(workdir))}: {found}", result.stderr), \
        result.stderr
    assert _snapshot(tmp_path) == before


@needs_venv
def test_a_file_as_workdir_and_bad_settings_are_refused(tmp_path):
    target = tmp_path / "demo"
    target.write_text("a file")
    result = _demo(target, tmp_path)
    assert result.returncode == 2 and f"demo --workdir {target}: it exists and is not a directory" in result.stderr
    assert target.read_text() == "a file"

    for env, message in [({"STARFLOW2_DEMO_SIZE": "huge"}, "STARFLOW2_DEMO_SIZE='huge': expected 'demo'"),
                         ({"STARFLOW2_DEMO_STOP_AFTER": "stage4"}, "STARFLOW2_DEMO_STOP_AFTER='stage4': expected one "
                                                                   "of stage0 stage1 stage2 stage3")]:
        result = _demo(tmp_path / "new", tmp_path, **env)
        assert result.returncode != 0 and message in result.stderr, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["demo"]


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"]])
def test_help_is_true_and_shows_both_demos(argv):
    result = subprocess.run(["bash", str(LOCAL_SH), *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "demo [--workdir DIR]" in result.stderr and "demo --flow [--workdir DIR]" in result.stderr

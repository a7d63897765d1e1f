"""A run's workdir that nothing corrupts or misreads: the lock, the stored config as identity, verified
checkpoints, non-finite config values, static checks before the first write, and metrics.jsonl across
kill -9 / SIGTERM. Each fault is injected for real; a refused start must leave every file as it was."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from train_helpers import ToyTask, metric_steps, pipeline, start_training, tiny_config, wait_for

from starflow2_jax.train import train
from starflow2_jax.train import identity, lock, manifest, metrics, restore
from starflow2_jax.train.config_schema import validate

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def snapshot(directory: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file below ``directory`` (directories as '<dir>')."""
    out = {}
    for path in sorted(directory.rglob("*")):
        rel = os.fspath(path.relative_to(directory))
        out[rel] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 6-step ToyTask run with checkpoints at steps 2, 4, 6 (and its config)."""
    workdir = tmp_path_factory.mktemp("guards") / "run"
    config = tiny_config(**{"train.async_checkpoint": False})
    result = train(config, workdir, task=ToyTask(), data=pipeline(config))
    assert result.step == 6 and result.no_checkpoint == ""
    return workdir, config


def copy_run(trained, tmp_path) -> Path:
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir)
    return workdir


def biggest_file(step_dir: Path, item: str = "state") -> Path:
    return max((p for p in (step_dir / item).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


# --- non-finite config values -------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("optim.lr", math.nan), ("optim.lr", math.inf),
                                         ("optim.clip_norm", math.nan), ("optim.ema_decay", -math.inf)])
def test_non_finite_floats_are_rejected(field, value):
    config = tiny_config(**{field: value})
    with pytest.raises(ValueError, match=rf"^{field.replace('.', '[.]')}=(nan|inf|-inf): expected a finite number"):
        validate(config)


def test_non_finite_values_inside_lists_and_model_kwargs_are_named():
    config = tiny_config(**{"sample.guidance": [1.0, math.nan]})
    with pytest.raises(ValueError, match=r"^sample\.guidance\[1\]=nan: expected a finite number"):
        validate(config)
    config = tiny_config()
    config.model.flow.kwargs.dropout = math.inf
    with pytest.raises(ValueError, match=r"^model\.flow\.kwargs\.dropout=inf: expected a finite number"):
        validate(config)


# --- the workdir lock --------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{repo!r}]
    from starflow2_jax.train.lock import WorkdirLock
    with WorkdirLock({workdir!r}):
        print("HELD", flush=True)
        time.sleep(120)
""")


def test_a_second_job_is_refused_naming_the_holder(trained, tmp_path):
    workdir = copy_run(trained, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(repo=str(REPO), workdir=str(workdir))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "HELD"
        before = snapshot(workdir)
        stored = json.loads((workdir / lock.LOCK_FILE).read_text())
        config = tiny_config(**{"train.steps": 8})
        with pytest.raises(lock.WorkdirLockedError) as error:
            train(config, workdir, task=ToyTask(), data=pipeline(config))
        message = str(error.value)
        assert f"PID {holder.pid}" in message and f"host {os.uname().nodename}" in message
        assert f"started {stored['started']}" in message
        assert snapshot(workdir) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_with_a_warning(trained, tmp_path, caplog):
    workdir = copy_run(trained, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (workdir / lock.LOCK_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout),
                                                      "pid_start": 1, "started": "2026-01-01T00:00:00+00:00"}))
    config = tiny_config(**{"train.steps": 7})
    with caplog.at_level("WARNING"):
        result = train(config, workdir, task=ToyTask(), data=pipeline(config))
    assert result.step == 7
    assert f"PID {int(dead.stdout)}" in caplog.text and "no longer running" in caplog.text
    assert not (workdir / lock.LOCK_FILE).exists()  # released at the end


def test_a_refused_fresh_workdir_leaves_nothing(tmp_path):
    parent = tmp_path / "parent"
    parent.mkdir()
    config = tiny_config(**{"data.batch_size": 12})  # 8 devices: 12 rows do not split
    with pytest.raises(ValueError, match=r"^data\.batch_size=12: expected a multiple of the 8 batch shards"):
        train(config, parent / "run", task=ToyTask(), data=pipeline(config))
    assert list(parent.iterdir()) == []


# --- the stored config is the run's identity --------------------------------------------------

def test_compare_lists_every_fixed_field_and_returns_the_allowed_changes():
    stored = {"model": {"flow": {"kwargs": {"channels": 64}}}, "data": {"batch_size": 8}, "train": {"steps": 6},
              "frozen": {"latent": {"fingerprint": "a"}}}
    requested = {"model": {"flow": {"kwargs": {"channels": 32}}}, "data": {"batch_size": 16}, "train": {"steps": 9},
                 "frozen": {"latent": {"fingerprint": "b"}}}
    with pytest.raises(identity.ConfigMismatchError) as error:
        identity.compare(stored, requested)
    listed = str(error.value).split("(old -> new): ")[1].split("; expected")[0]
    assert listed == "data.batch_size: 8 -> 16; model.flow.kwargs.channels: 64 -> 32"  # not steps, not frozen.*
    stored["model"], stored["data"] = requested["model"], requested["data"]
    assert identity.compare(stored, requested) == ["train.steps: 6 -> 9"]
    assert identity.compare({}, {"seed": 0}, defaults={"seed": 0}) == []  # a field added later: its default
    with pytest.raises(identity.ConfigMismatchError, match=r"seed: \(absent\) -> 0"):
        identity.compare({}, {"seed": 0})


def test_a_changed_model_or_data_field_is_refused_before_any_write(trained, tmp_path):
    workdir = copy_run(trained, tmp_path)
    before = snapshot(workdir)
    config = tiny_config(**{"model.flow.kwargs.channels": 32, "data.levels": 255, "train.steps": 8})
    with pytest.raises(identity.ConfigMismatchError) as error:
        train(config, workdir, task=ToyTask(), data=pipeline(config))
    message = str(error.value)
    assert "in 2 field(s)" in message
    assert "data.levels: 16 -> 255" in message and "model.flow.kwargs.channels: 64 -> 32" in message
    assert snapshot(workdir) == before


def test_an_allowed_change_is_logged_and_resumes(trained, tmp_path, caplog):
    workdir = copy_run(trained, tmp_path)
    config = tiny_config(**{"train.steps": 8, "train.log_every": 2, "train.async_checkpoint": False})
    with caplog.at_level("INFO"):
        result = train(config, workdir, task=ToyTask(), data=pipeline(config))
    assert result.step == 8
    assert "train.steps: 6 -> 8" in caplog.text and "train.log_every: 1 -> 2" in caplog.text
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 8


# --- verified checkpoints ---------------------------------------------------------------------

def test_every_step_has_a_manifest_matching_its_files(trained):
    root = trained[0] / "checkpoints"
    for step in (2, 4, 6):
        listed = json.loads((root / str(step) / manifest.MANIFEST).read_text())["files"]
        on_disk = {os.fspath(p.relative_to(root / str(step))) for p in (root / str(step)).rglob("*")
                   if p.is_file() and p.name != manifest.MANIFEST}
        assert set(listed) == on_disk
        name = sorted(listed)[0]
        import zlib
        data = (root / str(step) / name).read_bytes()
        assert listed[name] == [len(data), zlib.crc32(data)]


def _damage(kind: str, step_dir: Path) -> str:
    """Damages ``step_dir`` as ``kind`` says; returns the damaged file's name relative to the step."""
    if kind == "flipped":
        target = biggest_file(step_dir)
        data = bytearray(target.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 8] = bytes(255 - b for b in data[middle:middle + 8])
        target.write_bytes(bytes(data))
    elif kind == "deleted":
        target = step_dir / "state" / "_METADATA"
        target.unlink()
    else:
        target = biggest_file(step_dir)
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    return os.fspath(target.relative_to(step_dir))


@pytest.mark.parametrize("kind,what", [("flipped", ": checksum "), ("deleted", ": missing"),
                                       ("truncated", " bytes, expected ")])
def test_a_damaged_step_is_named_with_the_newest_intact_step(trained, tmp_path, kind, what):
    workdir = copy_run(trained, tmp_path)
    name = _damage(kind, workdir / "checkpoints" / "6")
    before = snapshot(workdir)
    config = tiny_config(**{"train.steps": 8})
    with pytest.raises(manifest.CheckpointDamagedError) as error:
        train(config, workdir, task=ToyTask(), data=pipeline(config))
    message = str(error.value)
    assert f"checkpoint step 6 in {workdir / 'checkpoints'} is damaged ({name}:" in message and what in message
    assert "the newest intact step is 4" in message
    assert snapshot(workdir) == before
    with pytest.raises(manifest.CheckpointDamagedError, match=rf"step 6 .* is damaged \({name}: .*newest intact "
                                                                 r"step is 4"):
        restore.latest_step_dir(workdir)  # sample / eval / generate read through this
    with restore.skip_verification():
        assert restore.latest_step_dir(workdir)[0] == 6


def test_resume_intact_resumes_from_the_newest_intact_step_when_asked(trained, tmp_path):
    workdir = copy_run(trained, tmp_path)
    _damage("flipped", workdir / "checkpoints" / "6")
    config = tiny_config(**{"train.steps": 7, "train.async_checkpoint": False})
    task = ToyTask()
    result = train(config, workdir, task=task, data=pipeline(config), resume_intact=True)
    assert result.step == 7 and len(task.seen) == 3  # steps 5, 6, 7: resumed from step 4
    assert (workdir / "checkpoints" / "6.damaged").is_dir()
    assert metric_steps(workdir) == list(range(1, 8))  # 5 and 6 logged once, by the resumed run


def test_verify_false_skips_the_check(trained, tmp_path):
    workdir = copy_run(trained, tmp_path)
    (workdir / "checkpoints" / "6" / "extra" / "unlisted").write_text("x")  # a new file is not damage
    target = workdir / "checkpoints" / "6" / manifest.MANIFEST
    listed = json.loads(target.read_text())
    first = sorted(listed["files"])[0]
    listed["files"][first][1] ^= 1  # the manifest disagrees with an intact file
    target.write_text(json.dumps(listed))
    config = tiny_config(**{"train.steps": 7})
    with pytest.raises(manifest.CheckpointDamagedError, match=rf"\({first}: checksum"):
        train(config, workdir, task=ToyTask(), data=pipeline(config))
    assert train(config, workdir, task=ToyTask(), data=pipeline(config), verify=False).step == 7


# --- metrics.jsonl across interruptions ------------------------------------------------------

def test_drop_after_keeps_the_lines_up_to_the_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    assert metrics.drop_after(path, 2) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert metrics.drop_after(tmp_path / "none.jsonl", 2) == 0


@pytest.mark.slow
def test_kill_9_then_resume_logs_every_step_once(tmp_path):
    workdir = tmp_path / "run"
    overrides = {"train.steps": 100000, "train.checkpoint_every": 3, "train.log_every": 1, "optim.warmup_steps": 0,
                 "train.async_checkpoint": False, "train.keep_last": 100}
    process = start_training(workdir, overrides)
    try:
        wait_for(lambda: len(metric_steps(workdir)) >= 8, process, "the run never logged 8 steps")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    killed_at = max(metric_steps(workdir))
    assert (workdir / lock.LOCK_FILE).exists()  # a dead holder's lock: taken over below
    saved = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved < killed_at  # steps after the checkpoint were logged and will be replayed
    total = killed_at + 2
    config = tiny_config(**dict(overrides, **{"train.steps": total}))
    result = train(config, workdir, task=ToyTask(), data=pipeline(config))
    assert result.step == total
    assert metric_steps(workdir) == list(range(1, total + 1))


@pytest.mark.slow
def test_sigterm_at_a_non_logging_step_flushes_the_partial_window(tmp_path):
    workdir = tmp_path / "run"
    overrides = {"train.steps": 100000, "train.checkpoint_every": 0, "train.log_every": 5, "optim.warmup_steps": 0}
    process = start_training(workdir, overrides)
    try:
        wait_for(lambda: len(metric_steps(workdir)) >= 1, process, "the run never logged")
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr[-3000:]
    stopped = int([line for line in stdout.splitlines() if line.startswith("RESULT")][0].split()[1])
    logged = metric_steps(workdir)
    assert logged[-1] == stopped  # the partial window (or a full one) ends at the saved step
    assert logged[:-1] == list(range(5, stopped, 5)) or logged == list(range(5, stopped + 1, 5))
    total = stopped + 3
    config = tiny_config(**dict(overrides, **{"train.steps": total}))
    result = train(config, workdir, task=ToyTask(), data=pipeline(config))
    assert result.step == total
    steps = metric_steps(workdir)
    # windows partition 1..total: the resumed run logs at the multiples of 5 after the stop, then at its end
    after = [s for s in range(stopped + 1, total) if s % 5 == 0] + [total]
    assert steps == sorted(set(steps)) and steps[steps.index(stopped) + 1:] == after


# --- a run that ends without a final checkpoint says why -----------------------------------

def test_a_run_ending_on_a_non_finite_step_reports_no_checkpoint(tmp_path):
    config = tiny_config(**{"train.max_nonfinite_steps": 10, "train.steps": 4})
    result = train(config, tmp_path / "run", task=ToyTask(nan_steps=(4,)), data=pipeline(config))
    assert result.step == 4
    assert result.no_checkpoint.startswith("the latest step (4) was non-finite (1 in a row)")
    assert "the latest checkpoint is step 2" in result.no_checkpoint

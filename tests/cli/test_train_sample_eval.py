"""`starflow2 train` → `sample` → `eval bpd` end to end on the demo's runlocal preset, and the
commands' error messages.

The end-to-end run is one test (one training run, whichever xdist worker gets it); the error
cases that need no trained model run without one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from starflow2_jax.cli.main import main
from starflow2_jax.train import Checkpointer, FlowTask, make_optimizer, state_shardings
from starflow2_jax.train.generate import sample_from_workdir
from starflow2_jax.train.restore import restore_workdir

SMOKE = "configs/demo.py:runlocal"


def _json_stdout(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def _check_restore_matches_the_trainer(workdir: str):
    """restore_workdir's EMA / raw params == the trainer's Checkpointer restoring the whole state."""
    restored = restore_workdir(workdir)
    assert restored.used_ema and restored.step == 4
    task = FlowTask.from_config(restored.config)
    optimizer, _ = make_optimizer(restored.config.optim, int(restored.config.train.steps))
    shardings = state_shardings(task, optimizer, restored.mesh, ema=True)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        state, _ = checkpointer.restore(4, shardings.abstract_state, shardings.abstract_extra, None)
    finally:
        checkpointer.close()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), jax.device_get(state.ema_params))
    raw = restore_workdir(workdir, ema=False)
    assert not raw.used_ema
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(raw.params), jax.device_get(state.params))
    return restored


def test_train_sample_eval_end_to_end(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    assert main(["train", "--config", SMOKE, "--workdir", workdir, "--config.train.log_every=1"]) == 0
    summary = _json_stdout(capsys)
    assert summary["step"] == 4 and not summary["interrupted"] and np.isfinite(summary["metrics"]["loss"])
    assert sorted(p for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit()) == ["2", "4"]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]  # the override took effect

    restored = _check_restore_matches_the_trainer(workdir)

    # a grid: one row per class, per_class (2) samples each, with guidance
    out = str(tmp_path / "out" / "grid.png")
    assert main(["sample", "--workdir", workdir, "--out", out, "--guidance", "2"]) == 0
    summary = _json_stdout(capsys)
    assert (summary["step"], summary["ema"], summary["guidance"], summary["grid"]) == (4, True, 2.0, [10, 2])
    assert summary["num_samples"] == 20 and summary["nonfinite_samples"] == 0
    with Image.open(out) as png:
        png.load()
        assert png.size == (8 * (2 * 9 + 1), 8 * (10 * 9 + 1))  # 1-pixel gutters, upscaled ×8
    with np.load(out[:-4] + ".npz") as npz:
        assert npz["images"].dtype == np.uint8 and npz["images"].shape == (20, 8, 8, 1)
        assert npz["samples"].dtype == np.float32 and np.all(np.isfinite(npz["samples"]))
        np.testing.assert_array_equal(npz["labels"], np.repeat(np.arange(10), 2))
        assert npz["pixels"].max() <= 16 and float(npz["guidance"]) == 2.0 and list(npz["prompts"]) == [""] * 20
        x = npz["samples"]
        np.testing.assert_array_equal(npz["images"], np.clip(np.rint((x + 1) * 127.5), 0, 255).astype(np.uint8))
    with open(out[:-4] + ".json") as f:
        assert json.load(f)["files"]["npz"] == out[:-4] + ".npz"
    assert not [p for p in os.listdir(os.path.dirname(out)) if ".tmp" in p]

    # one class, sequential: the samples do not depend on how they are batched
    one = sample_from_workdir(workdir, tmp_path / "a.png", label=3, num=3, seed=1, jacobi="off", batch_size=1,
                              restored=restored)
    sample_from_workdir(workdir, tmp_path / "b.png", label=3, num=3, seed=1, jacobi="off", restored=restored)
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        np.testing.assert_allclose(a["samples"], b["samples"], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(a["labels"], [3, 3, 3])
    assert one["grid"] == [1, 3] and one["jacobi"] is None
    jac = sample_from_workdir(workdir, tmp_path / "j.png", label=3, num=3, seed=1, jacobi="16,1e-6,32",
                              restored=restored)
    assert jac["jacobi"] == {"block_size": 16, "threshold": 1e-6, "max_iters": 32}
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "j.npz") as j:
        np.testing.assert_allclose(j["samples"], a["samples"], atol=1e-3)  # Jacobi converges to the same images

    # held-out bits/dim: every test image once (297 = 18 batches of 16 + 9, the rest padding)
    bpd_path = str(tmp_path / "bpd.json")
    assert main(["eval", "bpd", "--workdir", workdir, "--out", bpd_path, "--num-samples", "2"]) == 0
    result = _json_stdout(capsys)
    with open(bpd_path) as f:
        assert json.load(f) == result
    assert (result["split"], result["num_images"], result["step"], result["num_samples"]) == ("test", 297, 4, 2)
    assert np.isfinite(result["bits_per_dim"]) and 0 < result["std_error"] < 0.1
    assert abs(result["bits_per_dim"] - summary_bpd(workdir)) < 0.5  # near the training bpd after 4 steps

    # errors that need the trained model, named by the offending argument
    for args, pattern in [
        (["--label", "10"], "--label 10: expected a class in 0..9"),
        (["--prompt", "a digit seven"], "--prompt 'a digit seven': the model .* is conditioned on 'label'"),
    ]:
        assert main(["sample", "--workdir", workdir, "--out", str(tmp_path / "x.png"), *args]) == 2
        err = capsys.readouterr().err
        assert re.search(pattern, err), err
    assert main(["eval", "bpd", "--workdir", workdir, "--split", "validation"]) == 2
    assert "--split 'validation'" in capsys.readouterr().err
    assert main(["eval", "fae", "--workdir", workdir]) == 2  # a flow is not an FAE
    assert "FAE reconstruction errors need an FAE workdir" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.png") and not os.path.exists(tmp_path / "x.npz")

    # a resume asking for another model is refused before anything is written
    before = _snapshot(workdir)
    assert main(["train", "--config", SMOKE, "--workdir", workdir, "--config.train.steps=6",
                 "--config.model.flow.kwargs.channels=48"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.search(r"error: the requested config differs .* in 1 field\(s\) .*model\.flow\.kwargs\.channels: 32 "
                     r"-> 48", err[-1]), err
    assert _snapshot(workdir) == before

    # a flipped byte in the latest step: every reader names the file and the intact step 2
    data_file = max((p for p in (tmp_path / "run" / "checkpoints" / "4" / "state").rglob("*") if p.is_file()),
                    key=lambda p: p.stat().st_size)
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data_file.write_bytes(bytes(raw))
    before = _snapshot(workdir)
    name = os.path.relpath(data_file, os.path.join(workdir, "checkpoints", "4"))
    for command in (["sample", "--workdir", workdir, "--out", str(tmp_path / "y.png")],
                    ["eval", "bpd", "--workdir", workdir],
                    ["train", "--config", SMOKE, "--workdir", workdir, "--config.train.steps=6"]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert f"checkpoint step 4 in {workdir}/checkpoints is damaged ({name}: checksum" in err[-1], err
        assert "the newest intact step is 2" in err[-1]
    assert _snapshot(workdir) == before


def _snapshot(workdir: str) -> dict:
    """``{relative path: bytes}`` of every file below ``workdir``."""
    out = {}
    for root, _, names in os.walk(workdir):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), workdir)] = f.read()
    return out


def test_train_refuses_a_locked_workdir(tmp_path, capsys):
    workdir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from starflow2_jax.train.lock import "
                               f"WorkdirLock\nwith WorkdirLock({str(workdir)!r}):\n print('HELD', flush=True); "
                               "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "HELD"
        before = _snapshot(str(workdir))
        assert main(["train", "--config", SMOKE, "--workdir", str(workdir)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert re.search(rf"error: --workdir '{workdir}' is in use by another training job "
                         rf"\(host .*, PID {holder.pid}, started 20\d\d-", err[-1]), err
        assert _snapshot(str(workdir)) == before
    finally:
        holder.kill()
        holder.wait()


def test_train_names_a_corrupt_dataset_file_and_writes_nothing(tmp_path, capsys):
    import shutil

    from starflow2_jax.data import build_digits

    prepared = build_digits(tmp_path / "tfds")
    data_dir = tmp_path / "copy"
    shutil.copytree(prepared.data_dir, data_dir)
    shard = data_dir / "starflow2_digits-train.array_record-00000-of-00001"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    workdir = tmp_path / "run"
    assert main(["train", "--config", SMOKE, "--workdir", str(workdir), "--config.data.builder=directory",
                 f"--config.data.data_dir={data_dir}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.search(rf"error: data\.data_dir='{data_dir}': file {shard.name} .* is damaged", err[-1]), err
    assert not workdir.exists()


def summary_bpd(workdir: str) -> float:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f][-1]["bits_per_dim"]


@pytest.mark.parametrize("args,pattern", [
    (["--config.train.stepz=5"], "unknown field 'train.stepz'"),
    (["--config.train.steps=abc"], "--config.train.steps='abc': expected an int"),
    (["--config.optim.ema_decay=1.5"], "optim.ema_decay=1.5"),
    (["--config.data.builder=directory"], "data.data_dir is empty"),
    (["--config.data.builder=directory", "--config.data.data_dir=/no/such/dir"], "data.data_dir='/no/such/dir'"),
    (["--config.train.init_from=/no/such/run"], "train.init_from='/no/such/run'"),
    (["--stop-after=0"], "--stop-after 0"),
    (["extra-word"], "unrecognized arguments"),
    (["--config.optim.lr=nan"], "optim.lr=nan: expected a finite number"),
    (["--config.optim.lr=inf"], "optim.lr=inf: expected a finite number"),
    (["--config.optim.clip_norm=nan"], "optim.clip_norm=nan: expected a finite number"),
    (["--config.data.batch_size=12"], "data.batch_size=12: expected a multiple of the 8 batch shards"),
    (["--config.mesh.data=1", "--config.mesh.fsdp=3"], "mesh={'data': 1, 'fsdp': 3, 'tensor': 1}: expected axis "
                                                       "sizes whose product is the 8 devices here"),
])
def test_train_rejects_bad_configs_before_starting(tmp_path, capsys, args, pattern):
    workdir = tmp_path / "run"
    assert main(["train", "--config", SMOKE, "--workdir", str(workdir), *args]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("starflow2 train: error: ") and pattern in last, last  # the whole error on one line
    assert not workdir.exists()


@pytest.mark.parametrize("spec,pattern", [
    ("configs/demo.py:nope", "unknown preset 'nope'"),
    ("configs/nope.py", "config file 'configs/nope.py' not found"),
    ("configs/tarflow.py", "no preset given"),
])
def test_train_names_a_bad_config_file_or_preset(tmp_path, capsys, spec, pattern):
    assert main(["train", "--config", spec, "--workdir", str(tmp_path / "run")]) == 2
    assert pattern in capsys.readouterr().err


@pytest.mark.parametrize("args,pattern", [
    (["--workdir", "{tmp}/none", "--out", "{tmp}/g.png"], "--workdir '{tmp}/none' does not exist"),
    (["--workdir", "{tmp}", "--out", "{tmp}/g.png"], "has no complete checkpoint"),
    (["--workdir", "{tmp}", "--out", "{tmp}/g.jpg"], "--out '{tmp}/g.jpg': expected a .png"),
    (["--workdir", "{tmp}", "--out", "{tmp}/g.png", "--jacobi", "16,0.1"], "--jacobi '16,0.1'"),
    (["--workdir", "{tmp}", "--out", "{tmp}/g.png", "--guidance", "-1"], "--guidance -1.0"),
    (["--workdir", "{tmp}", "--out", "{tmp}/g.png", "--num", "0"], "--num 0"),
])
def test_sample_errors_name_the_argument(tmp_path, capsys, args, pattern):
    args = [a.format(tmp=tmp_path) for a in args]
    assert main(["sample", *args]) == 2
    assert pattern.format(tmp=tmp_path) in capsys.readouterr().err


def test_sample_label_and_prompt_exclude_each_other(tmp_path, capsys):
    assert main(["sample", "--workdir", str(tmp_path), "--out", "g.png", "--label", "1", "--prompt", "a one"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_eval_errors_name_the_argument(tmp_path, capsys):
    assert main(["eval", "bpd", "--workdir", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "bpd", "--workdir", str(tmp_path), "--num-samples", "0"]) == 2
    assert "--num-samples 0" in capsys.readouterr().err
    assert main(["eval", "bpd", "--workdir", str(tmp_path), "--out", "x.txt"]) == 2
    assert "--out 'x.txt'" in capsys.readouterr().err
    assert main(["eval"]) == 2  # an evaluation must be named


def test_cli_subprocess_reports_a_bad_override():
    result = subprocess.run(
        [sys.executable, "-m", "starflow2_jax.cli", "train", "--config", SMOKE, "--workdir", "/nonexistent/run",
         "--config.model.flow.kwargs.channels=wide"],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert "--config.model.flow.kwargs.channels='wide': expected an int" in result.stderr
    usage = subprocess.run([sys.executable, "-m", "starflow2_jax.cli", "--help"], capture_output=True, text=True,
                           timeout=120, check=False).stdout
    assert all(command in usage for command in ("train", "sample", "eval"))


def _untrained(spec: str, **overrides):
    """A ``Restored`` of a freshly initialised model (no checkpoint) for the sampling-only checks."""
    import flax.linen as nn
    import jax.numpy as jnp

    from starflow2_jax.config_files import load_config
    from starflow2_jax.train.loop import resolve_config
    from starflow2_jax.train.restore import Restored

    config = resolve_config(load_config(spec, [f"{k}={v}" for k, v in overrides.items()]))
    task = FlowTask.from_config(config)
    params, extra = task.init(jax.random.key(0))
    params = jax.tree.map(lambda p: p + 0.02 * jnp.ones_like(p), nn.meta.unbox(params))  # non-trivial heads
    return Restored(config=config, task=task, params=params, extra=extra, step=0, used_ema=False, mesh=None,
                    shardings=None, step_dir="<untrained>")


def test_caption_and_unconditional_sampling(tmp_path):
    from starflow2_jax.train.generate import generate, grid_image

    caption = _untrained("configs/demo.py:caption,runlocal")
    summary = sample_from_workdir("<untrained>", tmp_path / "p.png", prompt="a handwritten digit seven", num=3,
                                  guidance=1.5, restored=caption)
    assert summary["rows"] == ["a handwritten digit seven"] and summary["grid"] == [1, 3]
    with np.load(tmp_path / "p.npz") as npz:
        assert list(npz["prompts"]) == ["a handwritten digit seven"] * 3 and list(npz["labels"]) == [-1] * 3
    assert len(caption.task.prompts) == 10 and caption.task.prompts[7] == "a handwritten digit seven"
    with pytest.raises(ValueError, match=r"--prompt 'a cat': word\(s\) \['cat'\] are not in the model's caption"):
        generate(caption, prompt="a cat")
    with pytest.raises(ValueError, match=r"reads at most 8 \(model.text.max_len\)"):
        generate(caption, prompt=" ".join(["seven"] * 9))
    with pytest.raises(ValueError, match=r"--label 1: the model .* is conditioned on 'caption'.*use --prompt"):
        generate(caption, label=1)

    uncond = _untrained(SMOKE, **{"model.conditioning": "none", "model.flow.kwargs.num_classes": 0})
    samples = generate(uncond, num=10)
    assert samples.grid == (2, 8) and samples.images.shape == (10, 8, 8, 1)
    grid = grid_image(samples)
    assert grid.shape == (2 * 9 + 1, 8 * 9 + 1, 1) and np.all(grid[10:, 1 + 2 * 9:] == 255)  # empty cells white
    with pytest.raises(ValueError, match="unconditional"):
        generate(uncond, guidance=1.0)


def test_train_exits_1_when_the_run_ends_without_a_final_checkpoint(tmp_path, capsys, monkeypatch):
    """The trainer's ``no_checkpoint`` reason (tested in tests/train) becomes exit status 1 and one line."""
    from starflow2_jax.train import loop

    def fake_train(config, workdir, **kwargs):
        return loop.TrainResult(state=None, extra_vars=None, step=4, metrics={"loss": float("nan")},
                                interrupted=False, no_checkpoint="the latest step (4) was non-finite (1 in a row)")

    monkeypatch.setattr(loop, "train", fake_train)
    assert main(["train", "--config", SMOKE, "--workdir", str(tmp_path / "run")]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == ("starflow2 train: error: done at step 4. No final checkpoint: the latest step (4) was "
                    "non-finite (1 in a row)")


@pytest.mark.parametrize("code", [0, 143])
def test_a_run_stopped_by_sigterm_exits_with_the_preempted_exit_code(tmp_path, monkeypatch, capsys, code):
    """The loop's SIGTERM path is tested in tests/train; here only the exit status the CLI maps it to
    (a JobSet restarts a pod only when it fails: xpk.sh passes 143)."""
    from starflow2_jax.train import loop

    seen = {}

    def stopped_train(config, workdir, **kwargs):
        seen["workdir"] = workdir
        return loop.TrainResult(state=None, extra_vars=None, step=7, metrics={"loss": 1.0}, interrupted=True)

    monkeypatch.setattr(loop, "train", stopped_train)
    workdir = str(tmp_path / "run")
    args = ["train", "--config", SMOKE, "--workdir", workdir] + (["--preempted-exit-code", str(code)] if code else [])
    assert main(args) == code
    assert seen["workdir"] == workdir
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["interrupted"] is True
    assert "stopped by SIGTERM at step 7. Rerun the same command to resume." in err


def test_a_preempted_exit_code_outside_0_255_is_refused(tmp_path, capsys):
    assert main(["train", "--config", SMOKE, "--workdir", str(tmp_path / "run"), "--preempted-exit-code", "256"]) == 2
    assert "--preempted-exit-code 256: expected an exit status 0..255" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

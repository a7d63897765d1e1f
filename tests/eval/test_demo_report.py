"""The demo's scoring step (``python -m starflow2_jax.eval.demo``) and ``report.html`` on a workdir
laid out like the demo's, with real held-out digits standing in for generated ones."""

from __future__ import annotations

import base64
import json
import os

import numpy as np
import pytest
from sklearn.datasets import load_digits

from starflow2_jax.data import digits_split_indices
from starflow2_jax.eval import demo
from starflow2_jax.train import images as image_lib


def _write_picture(workdir, guidance: float, x: np.ndarray) -> None:
    grid = image_lib.tile(image_lib.to_uint8(x[:40].reshape(10, 4, 8, 8, 1)))
    image_lib.save_png(os.path.join(workdir, f"samples_cfg{guidance:g}.png"), grid, scale=4)


def _write_judged(workdir, guidance: float, x: np.ndarray, labels: np.ndarray) -> None:
    os.makedirs(os.path.join(workdir, "judged"), exist_ok=True)
    np.savez(os.path.join(workdir, "judged", f"samples_cfg{guidance:g}.npz"), samples=x, labels=labels,
             guidance=np.float32(guidance))


@pytest.fixture()
def workdir(tmp_path):
    digits = load_digits()
    index = digits_split_indices()["test"][:290]
    order = np.argsort(digits.target[index], kind="stable")
    x = (digits.images[index][order][..., None] / 8.0 - 1.0).astype(np.float32)  # (N, 8, 8, 1) in [-1, 1]
    labels = digits.target[index][order]
    _write_picture(tmp_path, 0, x)
    _write_picture(tmp_path, 2, x)
    for guidance in (0, 1, 2):
        _write_judged(tmp_path, guidance, x, labels)
    (tmp_path / "bpd.json").write_text(json.dumps({"bits_per_dim": 2.1, "num_examples": 297}))
    (tmp_path / "config.json").write_text(json.dumps({"train": {"steps": 3000}, "seed": 0}))
    (tmp_path / "metrics.jsonl").write_text('{"step": 50, "loss": 1.0}\n{"step": 3000, "loss": 0.5}\n')
    return tmp_path


def test_demo_scores_and_writes_report(workdir, capsys):
    assert demo.main(["--workdir", str(workdir), "--time", "train=301.5", "--time", "sample=12"]) == 0
    printed = capsys.readouterr().out
    assert "held-out bits/dim     2.100   (target <= 2.15: met)" in printed
    metrics = json.loads((workdir / "demo_metrics.json").read_text())
    assert [e["guidance"] for e in metrics["guidance"]] == [0.0, 1.0, 2.0]
    assert [e["png"] for e in metrics["guidance"]] == ["samples_cfg0.png", None, "samples_cfg2.png"]
    assert [e["npz"] for e in metrics["guidance"]] == [f"judged/samples_cfg{g}.npz" for g in (0, 1, 2)]
    assert metrics["bpd"] == 2.1 and metrics["steps"] == 3000
    assert metrics["guided_accuracy"] >= 0.98
    assert metrics["checks"] == {"bpd": True, "accuracy": metrics["guided_accuracy"] >= 0.99, "variety": True}
    assert metrics["timings"] == {"train": 301.5, "sample": 12.0}

    report = (workdir / "report.html").read_text()
    with open(workdir / "samples_cfg2.png", "rb") as f:
        assert base64.b64encode(f.read()).decode() in report  # self-contained
    assert report.count("data:image/png;base64,") == 2
    for text in ("2.100", "≤ 2.15", "2.18 bits/dim", "301.5 s", "3000 optimiser steps", "&quot;steps&quot;: 3000",
                 "judged/samples_cfg1.npz"):
        assert text in report, text
    assert not [p for p in os.listdir(workdir) if ".tmp" in p]


def test_demo_fails_loudly_on_missing_inputs(workdir, capsys):
    os.remove(workdir / "bpd.json")
    assert demo.main(["--workdir", str(workdir)]) == 1
    assert "missing" in capsys.readouterr().err and "bpd.json" not in os.listdir(workdir)
    assert not (workdir / "report.html").exists()


def test_demo_rejects_mislabelled_guidance_and_bad_arrays(workdir):
    path = workdir / "judged" / "samples_cfg2.npz"
    with np.load(path) as npz:
        x, labels = npz["samples"], npz["labels"]
    np.savez(path, samples=x, labels=labels, guidance=np.float32(1.0))
    with pytest.raises(demo.DemoInputError, match="file name says guidance 2"):
        demo.score(str(workdir))
    np.savez(path, images=x)
    with pytest.raises(demo.DemoInputError, match="expected arrays 'samples' and 'labels'"):
        demo.score(str(workdir))


def test_bad_timing_argument_is_a_usage_error(workdir):
    with pytest.raises(SystemExit):
        demo.main(["--workdir", str(workdir), "--time", "train"])

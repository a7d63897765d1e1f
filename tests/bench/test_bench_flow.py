"""The flow benchmark end to end on the tiny config: one JSON line on stdout with every key.

Throughputs are only checked to be positive and finite; wall-clock values are never asserted.
"""

from __future__ import annotations

import json
import math

import pytest

from starflow2_jax.bench import flow as bench_flow

REQUIRED_KEYS = (
    "benchmark", "config", "batch", "dtype", "remat", "devices", "jax", "train_steps_per_s", "train_step_ms",
    "compile_s", "sample_seq_images_per_s", "sample_seq_tokens_per_s", "sample_jacobi_images_per_s",
    "sample_jacobi_tokens_per_s", "jacobi_iterations", "jacobi_speedup",
    # side by side with PyTorch, and fractions of the matmul peak measured in the same run
    "torch", "torch_max_abs_diff_z", "torch_max_abs_diff_samples", "matmul_peak_gflops", "train_peak_fraction",
    "train_vs_torch", "sample_seq_vs_torch", "sample_best_vs_torch", "sample_seq_peak_fraction",
    # which OpenMP wait policy PyTorch's threads ran under (common.passive_openmp)
    "omp_wait_policy", "omp_wait_policy_source",
)
POSITIVE_KEYS = (
    "train_steps_per_s", "train_step_ms", "compile_s", "sample_seq_images_per_s", "sample_seq_tokens_per_s",
    "sample_jacobi_images_per_s", "sample_jacobi_tokens_per_s", "jacobi_speedup",
    "train_vs_torch", "sample_seq_vs_torch", "sample_best_vs_torch", "matmul_peak_gflops", "train_peak_fraction",
)


@pytest.mark.slow
def test_tiny_config_prints_one_json_line(capsys):
    assert bench_flow.main(["--config", "tiny", "--steps", "2", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines
    record = json.loads(lines[0])

    missing = [key for key in REQUIRED_KEYS if key not in record]
    assert not missing, missing
    assert (record["benchmark"], record["config"], record["batch"]) == ("flow", "tiny", 2)
    assert (record["dtype"], record["remat"]) == ("float32", "none")
    assert record["devices"]["count"] >= 1 and record["devices"]["platform"]
    for key in POSITIVE_KEYS:
        value = record[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)
    # tokens/s is images/s × tokens per image (tiny: 8x8 image, patch 2 → 16 tokens)
    assert record["sample_seq_tokens_per_s"] == pytest.approx(16 * record["sample_seq_images_per_s"], rel=2e-3)
    # one chunk of 15 generated positions per block: Jacobi needs 1..max_iters passes per block
    iterations = record["jacobi_iterations"]
    assert len(iterations) == 2 and all(1 <= i <= 32 for i in iterations), iterations
    assert math.isfinite(record["train_loss"]) and record["sample_finite"] is True
    # the PyTorch side computed the same model before it was timed
    assert record["torch_max_abs_diff_z"] < 1e-3 and record["torch_max_abs_diff_samples"] < 1e-3
    assert 0 < record["train_peak_fraction"] < 1.5  # analytic FLOPs over the measured peak: a sanity bound


def test_list_names_every_config(capsys):
    assert bench_flow.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny", "tarflow-32", "starflow-tiny", "tarflow-imagenet64"):
        assert name in out


def test_unknown_config_is_rejected(capsys):
    with pytest.raises(SystemExit):
        bench_flow.main(["--config", "no-such-config"])
    assert "no-such-config" in capsys.readouterr().err

"""The VLM benchmark end to end on a tiny config: one JSON line, ours beside transformers.

Throughputs are only checked to be positive and finite; wall-clock values are never asserted.
"""

from __future__ import annotations

import json
import math

import pytest

from starflow2_jax.bench import vlm as bench_vlm

TINY = ["--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--vocab", "512", "--batch", "2",
        "--prompt-len", "16", "--new-tokens", "8", "--repeats", "1"]
RATES = ("prefill_tokens_per_s", "decode_tokens_per_s", "prefill_ms", "generate_ms")


def run(capsys, *extra: str) -> dict:
    assert bench_vlm.main(TINY + list(extra)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


@pytest.mark.slow
def test_tiny_config_prints_one_json_line_beside_torch(capsys):
    record = run(capsys)
    assert (record["benchmark"], record["hidden"], record["batch"], record["new_tokens"]) == ("vlm", 64, 2, 8)
    assert record["devices"]["count"] >= 1 and record["jax"]
    for key in [f"jax_{k}" for k in RATES] + [f"torch_{k}" for k in RATES] + ["jax_compile_s"]:
        value = record[key]
        if value is None and key.endswith("decode_tokens_per_s"):
            continue  # a disturbed measurement (generate not slower than prefill) is reported as null
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)
    assert record["jax_prefill_tokens_per_s"] == pytest.approx(2 * 16 / record["jax_prefill_ms"] * 1e3, rel=2e-3)
    assert record["torch_device"] in ("cpu", "cuda") and record["torch_threads"] >= 1 and record["transformers"]
    assert record["tokens_match"] == 1.0  # same weights, float32, greedy


def test_skip_torch_and_bad_arguments(capsys):
    record = run(capsys, "--skip-torch")
    assert record["torch_decode_tokens_per_s"] is None and record["tokens_match"] is None
    assert record["jax_prefill_tokens_per_s"] > 0  # ours is still measured
    decode = record["jax_decode_tokens_per_s"]  # null when a loaded machine made generate ≤ prefill (see above)
    assert decode is None or decode > 0
    with pytest.raises(SystemExit, match="--new-tokens=1"):
        bench_vlm.main(TINY + ["--new-tokens", "1"])
    with pytest.raises(SystemExit, match="--heads=3"):
        bench_vlm.main(TINY + ["--heads", "3"])

"""The FAE benchmark: one JSON line on stdout for the tiny config (timed), and the paper-size 'g14_256'
config abstractly (parameter counts, compiled FLOPs/memory from shapes, nothing allocated).

Throughputs are only checked to be positive, finite and consistent with the per-call times; wall-clock
values are never asserted.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import pytest

from starflow2_jax.bench import fae as bench_fae

STAGES = ("encode", "decode", "roundtrip")
PARTS = ("dinov2", "encoder", "feature_decoder", "pixel_decoder")
# transformers' facebook/dinov2-giant has 1,136,480,768 parameters; 1,536 of them are the masked-image
# pre-training ``embeddings.mask_token`` (1, 1536), which our plain DINOv2 (inference only) leaves out.
HF_DINOV2_GIANT_PARAMS = 1_136_480_768
HF_MASK_TOKEN_PARAMS = 1536


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _one_record(capsys) -> dict:
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


@pytest.mark.slow
def test_tiny_config_prints_one_json_line(capsys):
    assert bench_fae.main(["--config", "tiny", "--batch", "4", "--steps", "2", "--repeats", "1"]) == 0
    record = _one_record(capsys)

    assert (record["benchmark"], record["config"], record["batch"], record["dtype"]) == ("fae", "tiny", 4, "float32")
    assert record["abstract"] is False and isinstance(record["device"], str) and record["device"]
    assert record["devices"]["count"] >= 1 and record["devices"]["platform"]
    assert (record["tokens"], record["latent_dim"]) == (64, 8)
    for part in PARTS:
        assert _positive(record["params"][part]), (part, record["params"])
    assert record["params"]["total"] == sum(record["params"][p] for p in PARTS)
    for stage in STAGES:
        timing = record[stage]
        for key in ("seconds_per_call", "images_per_second", "compile_seconds", "matmul_flops",
                    "matmul_flops_per_second"):
            assert _positive(timing[key]), (stage, key, timing[key])
        # each value is rounded to 4 significant digits: the ratio holds to ~1e-3
        assert timing["images_per_second"] == pytest.approx(4 / timing["seconds_per_call"], rel=2e-3)
    # the round trip runs exactly the encoder's and the decoder's matmuls
    assert record["roundtrip"]["matmul_flops"] == record["encode"]["matmul_flops"] + record["decode"]["matmul_flops"]
    for key in ("patches_encode_images_per_second", "patches_decode_images_per_second", "reconstruction_mse"):
        assert _positive(record[key]), (key, record[key])
    assert record["patches_latent_dim"] == 4 * 4 * 3  # 32 px over the 8x8 latent grid: 4-px patches
    assert record["patches_encode_images_per_second"] == pytest.approx(
        4 / record["patches_encode_seconds_per_call"], rel=2e-3)


def test_list_names_every_config(capsys):
    assert bench_fae.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny", "small", "g14_256"):
        assert name in out


def test_unknown_config_is_rejected(capsys):
    with pytest.raises(SystemExit) as info:
        bench_fae.main(["--config", "no-such-config"])
    assert info.value.code == 2 and "no-such-config" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no-such-config"):
        bench_fae.run("no-such-config")


@pytest.mark.parametrize("flag, value", [("--batch", "0"), ("--batch", "-3"), ("--steps", "0"), ("--repeats", "0")])
def test_bad_counts_are_rejected(capsys, flag, value):
    with pytest.raises(SystemExit) as info:
        bench_fae.main(["--config", "tiny", flag, value])
    assert info.value.code == 2 and f"{flag}={value}" in capsys.readouterr().err


def test_run_rejects_a_bad_batch():
    with pytest.raises(ValueError, match="batch=0"):
        bench_fae.run("tiny", batch=0)


def test_matmul_flops_counts_scan_bodies_once_per_step():
    w = jax.ShapeDtypeStruct((5, 8, 8), jnp.float32)  # 5 stacked (8, 8) layers
    x = jax.ShapeDtypeStruct((3, 8), jnp.float32)

    def stack(w, x):
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]

    assert bench_fae.matmul_flops(stack, w, x) == 5 * 2 * 3 * 8 * 8
    assert bench_fae.matmul_flops(jax.jit(lambda a, b: jnp.einsum("bij,bjk->bik", a, b)),
                                  jax.ShapeDtypeStruct((2, 3, 4), jnp.float32),
                                  jax.ShapeDtypeStruct((2, 4, 5), jnp.float32)) == 2 * 2 * 3 * 4 * 5


def test_dtype_is_set_in_both_configs():
    config = bench_fae.make_config("tiny", "bfloat16")
    assert (config.dtype, config.dinov2.dtype) == ("bfloat16", "bfloat16")
    assert bench_fae.make_config("g14_256").dinov2.dtype == "bfloat16"  # the paper preset's default
    patches = bench_fae.patches_space(bench_fae.make_config("g14_256"))
    assert (patches.grid, patches.patch) == ((16, 16), 16)


def _live_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays())


def _no_concrete_init(*args, **kwargs):
    raise AssertionError("an abstract run must not initialise (allocate) parameters")


@pytest.mark.slow
def test_g14_abstract_params_flops_and_memory(capsys, monkeypatch):
    monkeypatch.setattr(bench_fae, "init_variables", _no_concrete_init)
    before = _live_bytes()
    assert bench_fae.main(["--config", "g14_256", "--abstract", "--batch", "8"]) == 0
    record = _one_record(capsys)
    assert _live_bytes() - before < 64 << 20  # the model is 1.5e9 float32 parameters (6 GB)

    assert (record["config"], record["abstract"], record["dtype"], record["batch"]) == ("g14_256", True, "bfloat16", 8)
    params = record["params"]
    assert params["dinov2"] == HF_DINOV2_GIANT_PARAMS - HF_MASK_TOKEN_PARAMS
    for part in ("encoder", "feature_decoder", "pixel_decoder"):
        assert _positive(params[part]), (part, params)
    for stage in STAGES:
        entry = record[stage]
        assert entry["seconds_per_call"] is None and entry["images_per_second"] is None
        assert _positive(entry["compile_seconds"]) and _positive(entry["matmul_flops"])
        assert entry["memory"] is not None and entry["memory"]["argument_size_in_bytes"] > 0
    # parameters are float32: the encoder's arguments hold at least the DINOv2 + encoder weights
    assert record["encode"]["memory"]["argument_size_in_bytes"] >= 4 * (params["dinov2"] + params["encoder"])
    # DINOv2 dominates the encoder: ≥ 2·B·257 tokens·(its weights) matmul FLOPs (patch tokens + [CLS])
    assert record["encode"]["matmul_flops"] >= 2 * 8 * 257 * 0.99 * params["dinov2"]
    assert record["roundtrip"]["matmul_flops"] == record["encode"]["matmul_flops"] + record["decode"]["matmul_flops"]
    assert record["reconstruction_mse"] is None and record["patches_encode_images_per_second"] is None


def test_g14_params_only_on_cpu_is_abstract(capsys, monkeypatch):
    monkeypatch.setattr(bench_fae, "init_variables", _no_concrete_init)
    assert bench_fae.main(["--config", "g14_256", "--params-only"]) == 0
    record = _one_record(capsys)
    assert record["abstract"] is True and all(record[stage] is None for stage in STAGES)
    assert record["params"]["dinov2"] == HF_DINOV2_GIANT_PARAMS - HF_MASK_TOKEN_PARAMS
    assert record["params"]["total"] == sum(record["params"][p] for p in PARTS)


@pytest.mark.skipif(jax.devices()[0].platform != "cpu", reason="the forced-abstract rule applies on a CPU")
def test_g14_is_forced_abstract_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(bench_fae, "run_concrete", _no_concrete_init)
    monkeypatch.setattr(bench_fae, "run_abstract",
                        lambda config, batch, **kw: calls.append((config.image_size, batch, kw)) or {"params": {}})
    record = bench_fae.run("g14_256", batch=2)
    assert record["abstract"] is True and calls == [(256, 2, dict(compile_stages=True, seed=0))]

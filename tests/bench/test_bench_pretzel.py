"""The Pretzel benchmark at the tiny size: one JSON line (and the same record in ``--json PATH``) with
every field present and finite, the re-encoding baseline checked against the shared caches, and the
packed training batch it times. Wall-clock values are never asserted."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from starflow2_jax import pretzel
from starflow2_jax.bench import pretzel as bench_pretzel

GENERATE_KEYS = ("image_tokens_per_s", "images_per_s", "ms", "passes", "compile_s")
INTERLEAVED_KEYS = ("shared_ms", "reencode_ms", "reencode_over_shared", "shared_positions_per_s",
                    "reencode_positions_per_s", "generated_positions", "warmup_s")
TRAIN_KEYS = ("train_steps_per_s", "train_step_ms", "train_tokens_per_s", "tokens_per_batch", "compile_s",
              "trainable_params", "loss_first", "loss")


def _positive(record: dict, keys, where: str) -> None:
    for key in keys:
        value = record[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (where, key, value)


@pytest.mark.slow
def test_tiny_prints_one_json_line_and_writes_it(capsys, tmp_path):
    path = tmp_path / "out" / "pretzel.json"
    argv = ["--size", "tiny", "--repeats", "1", "--steps", "1", "--images", "1,2", "--json", str(path)]
    assert bench_pretzel.main(argv) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 1, lines
    record = json.loads(lines[0])
    assert json.loads(path.read_text()) == record
    assert (record["benchmark"], record["size"]) == ("pretzel", "tiny")
    n = pretzel.tiny().num_slots
    g = record["generate"]
    for kind in ("unguided", "guided"):
        for mode in ("sequential", "jacobi"):
            _positive(g[f"{kind}_{mode}"], GENERATE_KEYS, f"{kind}_{mode}")
            assert 1 <= g[f"{kind}_{mode}"]["passes"] <= n * 32
        assert g[f"{kind}_sequential"]["passes"] == n  # one pass per slot
        _positive(g, (f"{kind}_jacobi_speedup",), "generate")
    inter = record["interleaved"]
    assert sorted(inter["per_images"]) == ["1", "2"]
    for images, r in inter["per_images"].items():
        _positive(r, INTERLEAVED_KEYS, f"interleaved {images}")
        assert r["generated_positions"] == (int(images) + 1) * inter["text_tokens"] + int(images) * (n + 2)
        assert 0 <= r["max_latent_diff"] <= 1e-3
    _positive(record["train"], TRAIN_KEYS, "train")
    assert "direct" in record["train"]["path"]
    assert "interleaved (ms per document)" in captured.err and "re-encode" in captured.err


@pytest.mark.slow
def test_reencoding_baseline_matches_shared_caches():
    """The baseline re-runs both streams from scratch after each image; it must continue exactly as the
    shared caches do (the bench refuses to time otherwise). Same static shapes as the test above, so
    the jitted pieces compile once for both."""
    config = bench_pretzel.tiny_size()
    params, vlm_params = bench_pretzel.make_params(config, 3)
    kwargs = dict(images=2, text_tokens=8, guidance=3.0, seed=1)
    text_a, x_a = bench_pretzel.interleaved_run(config, params, vlm_params, reencode=False, **kwargs)
    text_b, x_b = bench_pretzel.interleaved_run(config, params, vlm_params, reencode=True, **kwargs)
    assert [len(t) for t in text_a] == [8, 8, 8] and text_a == text_b
    assert len(x_a) == 2 and x_a[0].shape == (config.num_slots, config.latent_dim)
    for a, b in zip(x_a, x_b):
        np.testing.assert_allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="cannot hold"):
        bench_pretzel.interleaved_run(config, params, vlm_params, reencode=False, length=10, **kwargs)


def test_packed_batch_rows():
    config = bench_pretzel.tiny_size()
    batch = bench_pretzel.packed_batch(config, 3, seed=0)
    pretzel.check_batch(config, batch, loss=True)
    doc_len = 12 + 8 + 6 + 2 * (config.num_slots + 2)
    docs = config.seq_len // doc_len
    docs = min(docs, config.max_images // 2)
    for row in range(3):
        seg = batch["segment_ids"][row]
        assert seg.max() == docs and np.sum(seg > 0) == docs * doc_len and np.all(seg[docs * doc_len:] == 0)
        assert batch["image_valid"][row].sum() == 2 * docs and batch["image_target"][row].sum() == 2 * docs
        assert sorted(set(batch["image_index"][row][batch["slot"][row]].tolist())) == list(range(2 * docs))


def test_sizes_and_arguments(capsys):
    assert bench_pretzel.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "mid" in out and "demo" in out
    demo = bench_pretzel.demo_size()  # the family's demo model, not a copy of its numbers
    from starflow2_jax.config_files import load_config

    s = load_config("configs/starflow2.py:demo,stage3").model.starflow2  # the preset's fields, read directly
    size, patch, channels = s.latent.image_size, s.latent.patch, s.latent.channels
    assert (demo.num_slots, demo.latent_dim) == ((size // patch) ** 2, patch * patch * channels)
    assert (demo.flow_width, demo.deep_layers, demo.seq_len) == (s.flow_width, s.deep_layers, s.seq_len)
    mid = bench_pretzel.mid_size()
    assert mid.num_slots == 64 and mid.latent_dim == 48 and mid.validate() is mid
    for argv, message in ((["--size", "huge"], "huge"), (["--images", "0,1"], "--images"),
                          (["--images", "8"], "at most"), (["--guidance", "0"], "--guidance"),
                          (["--repeats", "0"], "--repeats")):
        with pytest.raises(SystemExit, match=message):
            bench_pretzel.main(argv)

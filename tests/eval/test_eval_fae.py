"""`starflow2 eval fae` / ``evaluate_fae`` on tiny FAE workdirs (stages ia and ib, a few steps each).

Oracle: every image of the TFDS split read straight from the source, preprocessed with
``ImagePreprocess(levels=255, image_size=32, channels=3)`` and scored with
``fae.api.reconstruction_errors`` on the checkpoint's raw parameters, outside the data pipeline and
the sharded eval step; the per-image errors averaged (PSNR per image from the pixel MSE, then
averaged). The grid's rows are checked against the same oracle's images.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from starflow2_jax.cli.main import main
from starflow2_jax.eval.fae import evaluate_fae

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEST_SPLIT_SIZE = 353  # starflow2_jax.data.photos: 56 photo tiles + 297 digits
S = 32  # configs/fae.py:tiny image size


def _config(spec: str, data_dir: str, init_from: str = ""):
    from starflow2_jax.config_files import load_config

    c = load_config(os.path.join(REPO, "configs", spec))
    c.data.data_dir = data_dir
    c.train.async_checkpoint = False
    c.train.init_from = init_from
    c.train.checkpoint_every = 0  # only the final step (4)
    return c


@pytest.fixture(scope="module")
def fae_workdirs(tmp_path_factory):
    """``({'ia', 'ib'} → workdir, data_dir)``: configs/fae.py:tiny,<stage>,runlocal (4 steps each)."""
    from starflow2_jax.train.loop import train

    root = tmp_path_factory.mktemp("eval_fae")
    data_dir = os.fspath(root / "tfds")
    workdirs, previous = {}, ""
    for stage in ("ia", "ib"):
        workdirs[stage] = os.fspath(root / stage)
        train(_config(f"fae.py:tiny,{stage},runlocal", data_dir, previous), workdirs[stage])
        previous = workdirs[stage]
    return workdirs, data_dir


def _oracle(workdir: str, data_dir: str, chunk: int = 64):
    """``({metric: mean over the test split}, per-image arrays, images (n, S, S, 3), full, real)``."""
    from starflow2_jax.data.photos import build_photos
    from starflow2_jax.data.preprocess import ImagePreprocess
    from starflow2_jax.fae import api as fae_api
    from starflow2_jax.train.restore import restore_workdir
    from starflow2_jax.train.tasks.fae import fae_config_from

    restored = restore_workdir(workdir, ema=False)
    config = fae_config_from(restored.config)
    variables = jax.device_get({"fae": restored.params, "dinov2": restored.extra["dinov2"]})
    source = build_photos(data_dir).as_data_source("test")
    prep = ImagePreprocess(levels=255, image_size=S, channels=3)
    rng = np.random.default_rng(0)
    images = np.stack([prep(source[i], rng)["image"] for i in range(len(source))])

    @jax.jit
    def errors(variables, x):
        out = fae_api.reconstruction_errors(config, variables, x)
        feats = fae_api.encoder_features(config, variables["dinov2"], x)
        mean, _ = fae_api.encode_features(config, variables["fae"], feats)
        full = fae_api.decode_pixels(config, variables["fae"], fae_api.decode_features(config, variables["fae"], mean))
        return out, full, fae_api.decode_pixels(config, variables["fae"], feats)

    parts = [errors(variables, jnp.asarray(images[i:i + chunk])) for i in range(0, len(images), chunk)]
    per_image = {k: np.concatenate([np.asarray(p[0][k], np.float64) for p in parts]) for k in parts[0][0]}
    full = np.concatenate([np.asarray(p[1]) for p in parts])
    real = np.concatenate([np.asarray(p[2]) for p in parts])
    means = {k: float(v.mean()) for k, v in per_image.items()}
    means["psnr"] = float(np.mean(10 * np.log10(4 / per_image["pixel_mse"])))
    return means, images, full, real


def _check_grid(path: str, images, full, real, n: int):
    from starflow2_jax.train import images as image_lib

    grid = np.asarray(Image.open(path))
    assert grid.shape == (3 * (S + 1) + 1, n * (S + 1) + 1, 3)
    for r, row in enumerate((images, np.clip(full, -1, 1), np.clip(real, -1, 1))):
        for k in range(n):
            tile = grid[1 + r * (S + 1): 1 + r * (S + 1) + S, 1 + k * (S + 1): 1 + k * (S + 1) + S].astype(int)
            expected = image_lib.to_uint8(row[k]).astype(int)
            # originals exactly; reconstructions to one grey level (sharded vs unsharded float rounding)
            assert np.abs(tile - expected).max() <= (0 if r == 0 else 1), (r, k)


def _check_result(result, expected, workdir, stage, out):
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, rel=1e-5), name
    assert result["num_images"] == TEST_SPLIT_SIZE
    assert (result["split"], result["step"], result["stage"], result["workdir"]) == ("test", 4, stage, workdir)
    assert json.loads(out.read_text()) == result


def test_cli_eval_fae_matches_the_oracle(fae_workdirs, tmp_path, capsys):
    """Stage ib (latent statistics computed) through ``starflow2 eval fae``: JSON on stdout and in --out."""
    workdirs, data_dir = fae_workdirs
    out, grid = tmp_path / "fae.json", tmp_path / "grid.png"
    assert main(["eval", "fae", "--workdir", workdirs["ib"], "--batch-size", "64", "--out", os.fspath(out),
                 "--grid", os.fspath(grid)]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    expected, images, full, real = _oracle(workdirs["ib"], data_dir)
    print(f"stage ib: {result}")
    _check_result(result, expected, workdirs["ib"], "ib", out)
    assert len(images) == TEST_SPLIT_SIZE
    _check_grid(os.fspath(grid), images, full, real, 8)
    assert f"{TEST_SPLIT_SIZE} test images" in captured.err and "PSNR" in captured.err
    assert sorted(os.listdir(tmp_path)) == ["fae.json", "grid.png"]  # no temporary files left


def test_eval_fae_stage_ia_without_latent_statistics(fae_workdirs, tmp_path):
    """A stage-ia workdir (latent statistics never computed) evaluates too, grid included."""
    workdirs, data_dir = fae_workdirs
    out, grid = tmp_path / "fae.json", tmp_path / "grid.png"
    result = evaluate_fae(workdirs["ia"], split="test", batch_size=64, out=out, grid=grid, num_grid=5)
    expected, images, full, real = _oracle(workdirs["ia"], data_dir)
    print(f"stage ia: {result}")
    _check_result(result, expected, workdirs["ia"], "ia", out)
    _check_grid(os.fspath(grid), images, full, real, 5)


def test_eval_fae_refuses_a_missing_workdir_or_bad_arguments_and_writes_nothing(fae_workdirs, tmp_path, capsys):
    """(A flow workdir is refused in tests/cli/test_train_sample_eval.py, which trains one.)"""
    workdirs, _ = fae_workdirs
    out, grid = tmp_path / "out" / "fae.json", tmp_path / "out" / "grid.png"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_fae(tmp_path / "missing", out=out, grid=grid)
    with pytest.raises(ValueError, match="--split 'nope'"):
        evaluate_fae(workdirs["ib"], split="nope", out=out, grid=grid)
    with pytest.raises(ValueError, match="--batch-size 12"):
        evaluate_fae(workdirs["ib"], batch_size=12, out=out, grid=grid)
    assert not (tmp_path / "out").exists()

    assert main(["eval", "fae", "--workdir", os.fspath(tmp_path / "missing")]) == 2
    assert "starflow2 eval fae: error: --workdir" in capsys.readouterr().err
    assert main(["eval", "fae", "--workdir", workdirs["ib"], "--grid", "g.jpg"]) == 2
    assert "--grid 'g.jpg'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

"""`starflow2 generate`'s flags without a trained run: ``--image-temperature`` reaches
``eval.generate.generate`` (recorded by a stand-in), and bad values exit 2 naming the flag before anything
is read or written. (Generation from a trained run, the temperature included, is tested on the
starflow2 chain in tests/train/test_starflow2_family.py.)"""

from __future__ import annotations

import pytest

from starflow2_jax.cli.main import main


@pytest.fixture
def calls(monkeypatch):
    """The keyword arguments each `starflow2 generate` passes to ``eval.generate.generate`` (which only
    records them and returns a summary)."""
    from starflow2_jax.eval import generate as eval_generate

    seen = []

    def record(workdir, out_dir, **kwargs):
        seen.append(dict(kwargs, workdir=workdir, out_dir=out_dir))
        return dict(generated_images=0, generated_texts=[], seconds=0.0)

    monkeypatch.setattr(eval_generate, "generate", record)
    return seen


def test_image_temperature_reaches_the_generator(calls, tmp_path, capsys):
    base = ["generate", "--workdir", str(tmp_path / "run"), "--mode", "t2i", "--out", str(tmp_path / "out")]
    assert main(base + ["--image-temperature", "0.6"]) == 0
    assert main(base) == 0
    assert [c["image_temperature"] for c in calls] == [0.6, None]  # None: the run's sample.image_temperature
    capsys.readouterr()
    assert main(["generate", "--help"]) == 0
    assert "--image-temperature T" in capsys.readouterr().out


@pytest.mark.parametrize("value,message", [
    ("0", "--image-temperature 0.0: expected a finite number > 0"),
    ("-1", "--image-temperature -1.0: expected a finite number > 0"),
    ("nan", "--image-temperature nan: expected a finite number > 0"),
    ("hot", "argument --image-temperature: invalid float value: 'hot'"),
])
def test_bad_image_temperature_exits_2_naming_the_flag(tmp_path, capsys, value, message):
    """Checked before the workdir is read (it does not exist here) and before --out is created."""
    out = tmp_path / "out"
    code = main(["generate", "--workdir", str(tmp_path / "none"), "--mode", "interleaved", "--out", str(out),
                 "--image-temperature", value])
    assert code == 2 and message in capsys.readouterr().err and not out.exists()

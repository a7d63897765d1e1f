"""The README's Qwen2.5-VL example runs as written, on a tiny random checkpoint with the tiny tokenizer."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from qwen_hf_tiny import build
from tiny_tokenizer import save_tiny_tokenizer

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.slow
def test_readme_vlm_example_runs(tmp_path, monkeypatch):
    section = README.read_text().split("## Qwen2.5-VL (the frozen VLM)", 1)[1]
    example = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    model_dir = tmp_path / "qwen"
    build("gqa2_untied")[0].save_pretrained(str(model_dir))
    save_tiny_tokenizer(model_dir)
    monkeypatch.chdir(tmp_path)
    image = (np.random.default_rng(0).random((56, 84, 3)) * 255).astype(np.uint8)
    namespace = dict(model_dir=model_dir, image=image)
    exec(compile(example, str(README), "exec"), namespace)
    assert namespace["logits"].shape[0] == 1 and np.isfinite(np.asarray(namespace["logits"])).all()
    assert namespace["out"]["ids"].shape == (1, 64) and isinstance(namespace["out"]["text"][0], str)
    assert (tmp_path / "exported" / "config.json").is_file() and (tmp_path / "exported" / "tokenizer.json").is_file()

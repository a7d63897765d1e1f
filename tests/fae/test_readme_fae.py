"""The README's FAE example runs as written, on a tiny random DINOv2 checkpoint (transformers)."""

import re
from pathlib import Path

import jax
import numpy as np

from dinov2_hf_tiny import build

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_fae_example_runs(tmp_path):
    section = README.read_text().split("## The FAE latent space", 1)[1]
    example = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    model_dir = tmp_path / "dino"
    build("registers").save_pretrained(str(model_dir))
    images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
    namespace = dict(model_dir=model_dir, images=images)
    exec(compile(example, str(README), "exec"), namespace)
    assert namespace["features"].shape == (2, 64, 32) and np.isfinite(np.asarray(namespace["features"])).all()
    assert namespace["latents"].shape == (2, 64, 48)

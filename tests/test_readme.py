"""The README's flow example runs as written (on the STARFlow reference checkpoint)."""

import re
from pathlib import Path

import numpy as np

from starflow2_jax import convert

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_flow_example_runs(tmp_path, monkeypatch, starflow_fixture):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    example = blocks[0]
    sd = {k[3:]: v for k, v in starflow_fixture.items() if k.startswith("sd/")}
    convert.save_state_dict(sd, tmp_path / "starflow_tiny.pth")
    monkeypatch.chdir(tmp_path)
    namespace = dict(images_nhwc=starflow_fixture["x"].transpose(0, 2, 3, 1), text=starflow_fixture["y_cond"],
                     empty_caption=starflow_fixture["y_null"])
    namespace["text"] = np.concatenate([namespace["text"]] * 2)  # the example samples a batch of 4
    namespace["empty_caption"] = np.concatenate([namespace["empty_caption"]] * 2)
    namespace["images_nhwc"] = np.concatenate([namespace["images_nhwc"]] * 2)
    exec(compile(example, str(README), "exec"), namespace)
    exported = namespace["state_dict"]
    assert list(exported) == list(sd)
    assert all(np.array_equal(exported[k], sd[k]) for k in sd)
    assert np.isfinite(np.asarray(namespace["x_hat"])).all()

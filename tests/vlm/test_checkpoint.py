"""Orbax checkpoints of the VLM (vlm.save_checkpoint / load_checkpoint) and `starflow2 convert from-hf`."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qwen_hf_tiny import build
from starflow2_jax import convert, parallel, vlm


def leaves_equal(a, b) -> bool:
    return (jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
            and all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
                    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "tied"
    build("mha_tied")[0].save_pretrained(str(directory))
    return directory


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "starflow2_jax.cli", *args], capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.mark.slow
def test_cli_convert_from_hf_round_trip(hf_dir, tmp_path):
    out = tmp_path / "ckpt"
    result = run_cli("convert", "from-hf", "--model-dir", str(hf_dir), "--out", str(out), "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["out"] == str(out) and summary["dtype"] == "bfloat16" and summary["text_layers"] == 2
    config, params = vlm.load_checkpoint(out)
    expected_config, expected = convert.load_hf_qwen2_5_vl(hf_dir, "bfloat16")
    assert config == expected_config
    assert summary["parameters"] == sum(x.size for x in jax.tree_util.tree_leaves(expected))
    assert leaves_equal(params, expected)

    again = run_cli("convert", "from-hf", "--model-dir", str(hf_dir), "--out", str(out))
    assert again.returncode == 2 and "exists and is not an empty directory" in again.stderr
    missing = run_cli("convert", "from-hf", "--model-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"))
    assert missing.returncode == 2 and f"--model-dir '{tmp_path / 'nowhere'}': no such directory" in missing.stderr
    assert not (tmp_path / "x").exists()


def test_cli_convert_from_hf_errors_are_one_line_with_exit_2(hf_dir, tmp_path, capsys):
    """A missing directory, another architecture, a truncated shard: one line naming it, exit 2, no output."""
    import shutil

    from starflow2_jax.cli.main import main

    def convert_error(model_dir) -> str:
        assert main(["convert", "from-hf", "--model-dir", str(model_dir), "--out", str(tmp_path / "out")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("starflow2 convert from-hf: error: "), lines
        assert not (tmp_path / "out").exists()
        return lines[0]

    assert f"--model-dir '{tmp_path / 'nowhere'}': no such directory" in convert_error(tmp_path / "nowhere")
    other = tmp_path / "llama"
    shutil.copytree(hf_dir, other)
    config = json.loads((other / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (other / "config.json").write_text(json.dumps(config))
    assert "llama" in convert_error(other)
    truncated = tmp_path / "truncated"
    shutil.copytree(hf_dir, truncated)
    shard = truncated / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size - 100])
    message = convert_error(truncated)
    assert str(shard) in message and "truncated" in message


def test_save_and_load_onto_a_mesh(hf_dir, tmp_path):
    config, params = convert.load_hf_qwen2_5_vl(hf_dir)
    path = vlm.save_checkpoint(tmp_path / "ckpt", config, params)
    assert sorted(p.name for p in path.iterdir() if not p.name.startswith("_")) == [
        "commit_success.txt", "config", "params"]
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    restored_config, restored = vlm.load_checkpoint(path, mesh=mesh)
    assert restored_config == config
    assert restored["text"]["embed_tokens"].sharding.spec == P("tensor", "fsdp")
    assert leaves_equal(restored, params)
    with pytest.raises(FileExistsError, match="exists and is not an empty directory"):
        vlm.save_checkpoint(path, config, params)


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vlm.load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "half" / "params").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"lacks the item\(s\) \['config'\]"):
        vlm.load_checkpoint(tmp_path / "half")

"""The STARFlow2 digits demo's chain at ``runlocal`` size, built once per test session (``demo_chain``,
registered in ``tests/conftest.py``): stage 0 (``configs/lm.py:demo,runlocal``) and its ``starflow2 convert
to-hf`` export, then stages 1–3 (``configs/starflow2.py:demo,stageN,runlocal``) through ``starflow2 train``,
each from the previous one, laid out as ``launch/local.sh demo`` lays out its workdir::

    ROOT/demo.json                      {"kind": "starflow2-digits-demo", "size": "runlocal"}
    ROOT/stage0, ROOT/stage0_hf         the lm run and its export (the frozen VLM and tokenizer)
    ROOT/stage1, stage2, stage3         the starflow2 runs (2 steps each), each with train_summary.json
    ROOT/data                           the TFDS data dir the stages share

``FAST`` keeps each stage at seconds; batch 8 because runlocal's batch 4 does not divide the suite's 8
fake devices. The chain is read-only for its users: a test that writes copies what it needs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAST = ["--config.train.steps=2", "--config.train.log_every=1", "--config.train.checkpoint_every=0",
        "--config.train.async_checkpoint=False", "--config.data.batch_size=8"]
STAGES = ("stage1", "stage2", "stage3")


def stage_argv(root: Path, stage: str, workdir: Path, *extra: str) -> list[str]:
    """``starflow2 train`` arguments of ``stage`` (runlocal, ``FAST``) on the chain's export and data dir."""
    return (["train", "--config", f"{CONFIGS / 'starflow2.py'}:demo,{stage},runlocal", "--workdir",
             os.fspath(workdir), f"--config.model.starflow2.vlm_checkpoint={root / 'stage0_hf'}",
             f"--config.data.data_dir={root / 'data'}"] + FAST + list(extra))


@pytest.fixture(scope="session")
def demo_chain(tmp_path_factory) -> Path:
    """The chain's root (module docstring)."""
    from starflow2_jax.cli.main import main

    root = tmp_path_factory.mktemp("demo_chain")
    (root / "demo.json").write_text(json.dumps({"kind": "starflow2-digits-demo", "size": "runlocal"}))
    assert main(["train", "--config", f"{CONFIGS / 'lm.py'}:demo,runlocal", "--workdir",
                 os.fspath(root / "stage0")] + FAST) == 0
    assert main(["convert", "to-hf", "--workdir", os.fspath(root / "stage0"), "--out",
                 os.fspath(root / "stage0_hf")]) == 0
    previous = None
    for stage in STAGES:
        extra = [f"--config.train.init_from={previous}"] if previous else []
        assert main(stage_argv(root, stage, root / stage, *extra)) == 0, stage
        # what the orchestration writes when `starflow2 train` finished every step
        (root / stage / "train_summary.json").write_text(json.dumps({"workdir": os.fspath(root / stage), "step": 2,
                                                                     "interrupted": False}))
        previous = root / stage
    return root


def json_numbers(value, path: str = "metrics") -> list[tuple[str, float]]:
    """Every number in a JSON value (e.g. ``demo_metrics.json``), with its path."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, (int, float)):
        return [(path, value)]
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in json_numbers(v, f"{path}.{k}")]
    return [n for i, v in enumerate(value) for n in json_numbers(v, f"{path}[{i}]")]

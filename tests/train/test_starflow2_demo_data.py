"""The digits demo's stages 1–3 on data.builder='digits_documents' through `starflow2 train`, with a stage-0
export (configs/lm.py:demo,runlocal + `starflow2 convert to-hf`) as the frozen VLM and its tokenizer.

Oracles: the export's own parameters (the frozen VLM loaded bitwise), each stage's losses (the terms a
stage trains are finite and the others zero), and bad input: a clear error naming the field, and the
workdir (and its dataset folder) never created.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from demo_chain import CONFIGS, FAST
from starflow2_jax.cli.main import main
from starflow2_jax.train.restore import restore_workdir
from starflow2_jax.train.tasks import starflow2 as sf2

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("demo_chain")]  # one worker builds the session chain once


def _metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_demo_stages_1_2_3_train_on_digits_documents_with_the_stage0_vlm(demo_chain):
    """The chain (``demo_chain``: lm → to-hf → stage 1 → 2 → 3, each ``starflow2 train`` from the previous)."""
    for stage in sf2.STAGES:
        workdir = demo_chain / stage
        stored = json.loads((workdir / "config.json").read_text())
        assert stored["data"]["builder"] == "digits_documents" and stored["model"]["starflow2"]["tokenizer"] == ""
        assert stored["frozen"]["vlm"]["source"] == os.fspath(demo_chain / "stage0_hf")
        last = [m for m in _metrics(workdir) if "loss" in m][-1]
        assert last["step"] == 2 and math.isfinite(last["loss"])
        if stage == "stage1":  # L_NF only, on target images
            assert last["loss_ntp"] == 0 and last["loss_nf"] != 0 and last["images"] > 0
        elif stage == "stage2":  # L_NTP only, on answers and captions
            assert last["loss_nf"] == 0 and last["loss_ntp"] > 0 and last["text_tokens"] > 0
        else:
            assert last["loss_nf"] != 0 and last["loss_ntp"] > 0
    run = restore_workdir(demo_chain / "stage3")
    trained = restore_workdir(demo_chain / "stage0").params
    for a, b in zip(jax.tree.leaves(run.extra["vlm"]), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("override,message", [
    ("--config.data.kinds=['drawing']", r"data\.kinds=\['drawing'\]: unknown kind 'drawing'"),
    ("--config.data.kinds=['question']", r"data\.kinds=\['question'\]: 'question' is not read with "
                                         r"model\.starflow2\.pairs='t2i'"),
    ("--config.model.starflow2.seq_len=100", r"model\.starflow2\.seq_len=100: the longest 'interleaved' document"),
    ("--config.data.split=test", r"data\.split='test': data\.builder='digits_documents' draws its documents from "
                                 r"the digits' 'train' split only"),
    ("--config.model.starflow2.vlm_checkpoint=", r"model\.starflow2\.tokenizer='' reads the tokenizer\.json of "
                                                 r"model\.starflow2\.vlm_checkpoint, which is empty too"),
])
def test_bad_input_names_the_field_and_writes_nothing(demo_chain, tmp_path, capsys, override, message):
    import re

    workdir = tmp_path / "run"
    argv = ["train", "--config", f"{CONFIGS / 'starflow2.py'}:demo,stage1,runlocal", "--workdir", os.fspath(workdir),
            f"--config.model.starflow2.vlm_checkpoint={demo_chain / 'stage0_hf'}"] + FAST + [override]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not workdir.exists()  # nor its dataset folder (data.data_dir defaults to <workdir>/tfds)

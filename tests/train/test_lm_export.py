"""`starflow2 convert to-hf` (train.lm_export): an 'lm' run → a Hugging Face Qwen2.5-VL directory.

Oracles: transformers' PyTorch ``Qwen2_5_VLForConditionalGeneration`` and ``AutoTokenizer`` loading the
export; the run's restored parameters for the round trip through ``convert.load_hf_qwen2_5_vl``; a
STARFlow2 stage-1 run that loads the export as its frozen VLM. One tiny lm run per module (4 steps).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from starflow2_jax import convert, vlm
from starflow2_jax.cli.main import main
from starflow2_jax.data import demo_text as dt
from starflow2_jax.train.restore import restore_workdir
from starflow2_jax.train.tasks import lm
from starflow2_jax.train.tasks.starflow2_data import HFTokenizer

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LM_FAST = ["--config.model.lm.corpus_documents=300", "--config.model.lm.seq_len=128",
           "--config.train.async_checkpoint=False"]
SF2_FAST = ["--config.train.steps=1", "--config.train.log_every=1", "--config.train.checkpoint_every=0",
            "--config.data.batch_size=8", "--config.train.async_checkpoint=False", "--config.sample.guidance=[0.0]"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The lm run (tiny, 4 steps), its export through the CLI, and the export's summary."""
    root = tmp_path_factory.mktemp("lm")
    workdir, out = root / "lm", root / "hf"
    assert main(["train", "--config", f"{CONFIGS / 'lm.py'}:tiny,runlocal", "--workdir", os.fspath(workdir)]
                + LM_FAST) == 0
    assert main(["convert", "to-hf", "--workdir", os.fspath(workdir), "--out", os.fspath(out)]) == 0
    return dict(root=root, workdir=workdir, out=out)


def _corpus_sample(restored):
    s = restored.config.model.lm
    return [d for d in lm.corpus_of(s) if d.kind in ("counting", "question")
            and not d.digits][:2]


def test_transformers_loads_the_export_and_gives_our_logits(run):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    restored = restore_workdir(run["workdir"])
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(os.fspath(run["out"]), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(run["out"]))
    ours = HFTokenizer(os.fspath(run["out"]))
    text_config = lm.vlm_config_from(restored.config.model.lm)
    for doc in _corpus_sample(restored):
        text = dt.render(doc, 4)
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == ours.encode(text)
        with torch.no_grad():
            theirs = model(input_ids=torch.tensor([ids]), mm_token_type_ids=torch.zeros(1, len(ids),
                                                                                         dtype=torch.long)).logits
        mine = vlm.text_forward(text_config, restored.params["text"], np.asarray([ids], np.int32))
        np.testing.assert_allclose(np.asarray(mine), theirs.numpy(), atol=1e-4, rtol=0)
    assert tokenizer.eos_token_id == text_config.eos_token_ids[0]


def test_transformers_reads_a_digit_through_the_exported_tower_and_processor(run):
    """A "What digit is this?" document with a real digit: transformers' model and image processor, both
    loaded from the export, give the trained answer tokens the −log p the run's own training step gives."""
    from transformers import AutoImageProcessor, Qwen2_5_VLForConditionalGeneration

    from starflow2_jax.data.packing import pack_documents
    from starflow2_jax.train.loop import resolve_config

    restored = restore_workdir(run["workdir"])
    config = resolve_config(restored.config)
    s = config.model.lm
    task = lm.LMTask.from_config(config)
    assert task.vision_config is not None  # the tiny preset pretrains a VLM (images 'digits')
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(os.fspath(run["out"]), dtype=torch.float32).eval()
    processor = AutoImageProcessor.from_pretrained(os.fspath(run["out"]))
    tokenizer = lm.tokenizer_of(s)
    layout = lm.LMLayout(task.layout, lambda t: tokenizer.encode(t, add_special_tokens=False).ids, lm.digits_pool())
    doc = next(d for d in lm.corpus_of(s) if d.kind == "question")
    laid = layout(doc, np.random.default_rng(1))
    assert len(laid["pixels"]) == 1
    row = pack_documents([laid], lm.packing_spec(task.layout, 16, images=True))
    ours = jax.jit(task.eval_step)(restored.params, {}, task.prepare_batch({k: v[None] for k, v in row.items()}),
                                   jax.random.key(0))["ntp_loss"][0]
    pixels = processor(images=list(laid["pixels"]), return_tensors="pt")
    ids = torch.from_numpy(laid["tokens"][None].astype(np.int64))
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=torch.from_numpy(np.moveaxis(laid["positions"], -1, 0)[:, None]
                                                                    .astype(np.int64)),
                       mm_token_type_ids=(ids == task.vlm_config.image_token_id).long(),
                       pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"]).logits[0]
    logp = torch.log_softmax(logits.double(), -1).numpy()
    trained = np.nonzero(laid["text_loss"])[0]
    theirs = -np.mean([logp[t, laid["tokens"][t + 1]] for t in trained])
    np.testing.assert_allclose(float(ours), theirs, rtol=1e-4)


def test_load_hf_qwen2_5_vl_gives_the_trained_parameters_bitwise(run):
    restored = restore_workdir(run["workdir"])
    config, params = convert.load_hf_qwen2_5_vl(run["out"])
    assert config.text == lm.vlm_config_from(restored.config.model.lm)
    assert config.vision == lm.vision_config_from(restored.config.model.lm)
    trained = jax.tree_util.tree_flatten_with_path(restored.params)[0]
    loaded = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    assert len(trained) == len(loaded) and {p[0].key for p, _ in trained} == {"text", "vision"}
    for path, value in trained:
        np.testing.assert_array_equal(np.asarray(loaded[path]), np.asarray(value))


def test_starflow2_stage1_trains_with_the_export_as_its_frozen_vlm(run):
    workdir = run["root"] / "sf2"
    argv = ["train", "--config", f"{CONFIGS / 'starflow2.py'}:tiny,stage1,runlocal", "--workdir",
            os.fspath(workdir), f"--config.model.starflow2.vlm_checkpoint={run['out']}",
            "--config.model.starflow2.tokenizer=", f"--config.data.data_dir={run['root'] / 'tfds'}"] + SF2_FAST
    assert main(argv) == 0
    stored = json.loads((workdir / "config.json").read_text())
    assert stored["frozen"]["vlm"]["source"] == os.fspath(run["out"])
    sf2 = restore_workdir(workdir)
    trained = restore_workdir(run["workdir"]).params["text"]
    for a, b in zip(jax.tree.leaves(sf2.extra["vlm"]), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    run["sf2"] = workdir


def test_bad_input_clear_error_and_nothing_written(run, capsys):
    # a workdir that is not an lm run: the starflow2 run of the test above (or a fresh one)
    other = run.get("sf2")
    if other is None:
        test_starflow2_stage1_trains_with_the_export_as_its_frozen_vlm(run)
        other = run["sf2"]
    capsys.readouterr()
    out = run["root"] / "not_lm"
    assert main(["convert", "to-hf", "--workdir", os.fspath(other), "--out", os.fspath(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a model.family='starflow2' run; to-hf exports an 'lm' run" in err
    assert not out.exists()
    # an output directory that exists and is not empty: refused, left as it was
    busy = run["root"] / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert main(["convert", "to-hf", "--workdir", os.fspath(run["workdir"]), "--out", os.fspath(busy)]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    with pytest.raises(FileExistsError):
        from starflow2_jax.train.lm_export import export_lm_run

        export_lm_run(run["workdir"], busy)
    # a workdir without a checkpoint
    assert main(["convert", "to-hf", "--workdir", os.fspath(run["root"] / "missing"), "--out",
                 os.fspath(out)]) == 2
    assert "does not exist" in capsys.readouterr().err and not out.exists()
    assert not [p for p in run["root"].iterdir() if p.name.startswith(".")]  # no stray temporaries

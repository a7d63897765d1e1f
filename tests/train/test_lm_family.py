"""The 'lm' family (train.tasks.lm, configs/lm.py): the digits demo's stage 0 through the shared loop.

Oracles: transformers' PyTorch Qwen2.5-VL (random weights, converted by ``vlm.params``) computing the
next-token cross-entropy of each document alone, with the 3D positions pretzel's layout gives;
an uninterrupted run for the resumed one; the loss at the first step for the later ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from starflow2_jax.config_files import load_config
from starflow2_jax.data import demo_text as dt
from starflow2_jax.train.loop import resolve_config, train
from starflow2_jax.train.restore import restore_workdir
from starflow2_jax.train.tasks import lm
from starflow2_jax.vlm.config import QwenVLConfig, QwenVisionConfig
from starflow2_jax.vlm.params import text_params_from_torch

CONFIG = os.fspath(Path(__file__).resolve().parents[2] / "configs" / "lm.py")
SMALL = dict(model__lm__corpus_documents=300, model__lm__seq_len=128, train__steps=6, train__log_every=1,
             train__checkpoint_every=3, train__async_checkpoint=False, optim__warmup_steps=1,
             optim__lr=3e-3)  # the presets' 1e-3 is for 1000 steps; 6 steps need a faster descent


def _config(preset="tiny,runlocal", **fields):
    config = load_config(f"{CONFIG}:{preset}")
    for path, value in {**SMALL, **fields}.items():
        node = config
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _torch_model(vlm_config, vision=None):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = vision or QwenVisionConfig(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, window_size=56,
                                        fullatt_block_indexes=(0,), out_hidden_size=vlm_config.hidden_size)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QwenVLConfig(vlm_config, vision).to_hf_dict()))
    return model.float().eval()


@pytest.mark.parametrize("images", ["none", "digits"])
def test_loss_is_transformers_cross_entropy_of_each_packed_document(images):
    """Two corpus documents (one with an image) packed in a row: the task's loss is the mean of the trained
    tokens' −log p that transformers computes for each document alone at the layout's 3D positions. With
    images 'digits', transformers reads each digit through its own image processor and vision tower."""
    from transformers import Qwen2VLImageProcessorPil

    from starflow2_jax.vlm.vision_params import vision_params_from_torch

    config = resolve_config(_config(model__lm__images=images))
    s = config.model.lm
    task = lm.LMTask.from_config(config)
    model = _torch_model(task.vlm_config, task.vision_config)
    params = text_params_from_torch(model.state_dict(), task.vlm_config)
    if images == "digits":
        params = {"text": params, "vision": vision_params_from_torch(model.state_dict(), task.vision_config)}
    pcfg = lm.layout_config(task.vlm_config, s.grid, int(s.seq_len))
    tokenizer = lm.tokenizer_of(s)
    layout = lm.LMLayout(pcfg, lambda t: tokenizer.encode(t, add_special_tokens=False).ids,
                         lm.digits_pool() if images == "digits" else None)
    documents = [d for d in lm.corpus_of(s) if d.kind in ("draw", "arithmetic")]
    rng = np.random.default_rng(0)
    laid = [layout(documents[0], rng), layout(documents[1], rng)]
    assert {documents[0].kind, documents[1].kind} == {"draw", "arithmetic"}
    from starflow2_jax.data.packing import pack_documents

    row = pack_documents(laid, lm.packing_spec(pcfg, 16, images == "digits"))
    batch = task.prepare_batch({k: v[None] for k, v in row.items()})
    loss, metrics = jax.jit(task.loss)(params, {}, batch, jax.random.key(0))

    nll, count = [], 0
    for doc in laid:
        ids = torch.from_numpy(doc["tokens"][None].astype(np.int64))
        positions = torch.from_numpy(np.moveaxis(doc["positions"], -1, 0)[:, None].astype(np.int64))  # (3, 1, T)
        inputs = dict(input_ids=ids, position_ids=positions, mm_token_type_ids=torch.zeros_like(ids))
        if images == "digits" and len(doc["pixels"]):
            v = task.vision_config
            processor = Qwen2VLImageProcessorPil(patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                                 temporal_patch_size=v.temporal_patch_size, min_pixels=64,
                                                 max_pixels=64)
            out = processor(images=list(doc["pixels"]), return_tensors="pt")
            inputs.update(pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"],
                          mm_token_type_ids=(ids == task.vlm_config.image_token_id).long())
            assert out["image_grid_thw"].tolist() == [[1, 8 // v.patch_size, 8 // v.patch_size]] * len(doc["pixels"])
        with torch.no_grad():
            logits = model(**inputs).logits[0].double()
        logp = torch.log_softmax(logits, -1).numpy()
        trained = np.nonzero(doc["text_loss"])[0]
        nll += [-logp[t, doc["tokens"][t + 1]] for t in trained]
        count += len(trained)
    assert count == int(metrics["tokens"]) > 10
    np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-5)


def _losses(workdir):
    lines = [json.loads(x) for x in Path(workdir, "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines}


@pytest.mark.slow
def test_training_lowers_the_loss_and_resume_equals_an_uninterrupted_run(tmp_path):
    config = _config()
    whole = train(config, tmp_path / "whole")
    losses = _losses(tmp_path / "whole")
    assert losses[6] < 0.8 * losses[1], losses
    first = train(config, tmp_path / "resumed", stop_after=3)
    assert first.step == 3
    resumed = train(config, tmp_path / "resumed")
    assert resumed.step == 6
    for a, b in zip(jax.tree.leaves(whole.state.params), jax.tree.leaves(resumed.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _losses(tmp_path / "resumed") == losses
    restored = restore_workdir(tmp_path / "whole")
    assert restored.config.model.lm.tokenizer_sha256 == lm.tokenizer_sha256(lm.tokenizer_of(config.model.lm))


def test_bad_config_names_the_field(tmp_path):
    cases = [
        (dict(train__sample_every=2), r"train.sample_every=2: the 'lm' family draws no sample grids"),
        (dict(model__lm__vlm__image_token_id=100), r"<\|image_pad\|> is id 252 there, the config says 100"),
        (dict(model__lm__vlm__vocab_size=200), r"has 256 ids; model.lm.vlm.vocab_size=200 is smaller"),
        (dict(model__lm__grid=[2]), r"model.lm.grid=\[2\]: expected \[h, w\]"),
        (dict(model__lm__seq_len=5), r"model.lm.seq_len=5: one image of 2×2 slots"),
        (dict(model__lm__images="pixels"), r"model.lm.images='pixels': expected one of \('none', 'digits'\)"),
        (dict(model__lm__grid=[4, 4]), r"patch_size=2 and spatial_merge_size=2 do not read an 8×8 digit as "
                                       r"model.lm.grid=\[4, 4\]"),
        (dict(model__lm__vision__out_hidden_size=16), r"model.lm.vision.out_hidden_size=16: expected the text width"),
        (dict(model__lm__corpus_weights={"poem": 1.0}), r"model.lm.corpus_weights=\{'poem': 1.0\}: corpus weight "
                                                       r"of kind 'poem'"),
        (dict(model__lm__tokenizer=os.fspath(tmp_path)), r"no tokenizer.json there"),
        # a document longer than a row: an error from the first batch, before the workdir exists
        (dict(model__lm__seq_len=40), r"model.lm.seq_len=40: a '\w+' document of the corpus does not fit a row"),
    ]
    for fields, match in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            train(_config(**fields), tmp_path / "run")
        assert not (tmp_path / "run").exists()


def test_demo_preset_is_the_starflow2_demo_vlm():
    """configs/lm.py:demo trains the VLM configs/starflow2.py:demo describes (sizes and ids), with the
    slot grid of its latent (32×32 digits as 4×4 patches → 8×8)."""
    sf2 = load_config(os.fspath(Path(CONFIG).parent / "starflow2.py") + ":demo,stage1")
    config = load_config(f"{CONFIG}:demo")
    ours = lm.vlm_config_from(config.model.lm)
    theirs = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(sf2.model.starflow2.vlm).items()}
    assert {k: getattr(ours, k) for k in theirs} == theirs
    side = sf2.model.starflow2.latent.image_size // sf2.model.starflow2.latent.patch
    assert list(config.model.lm.grid) == [side, side]
    assert dt.MAX_INTERLEAVED_IMAGES * (side * side + 2) < config.model.lm.seq_len


def test_example_batch_has_the_pipeline_format():
    """``example_batch`` (what `starflow2 aot` lowers the step with) matches a batch of the real pipeline."""
    config = resolve_config(_config())
    task = lm.LMTask.from_config(config)
    real = task.prepare_batch(next(iter(lm.make_train_data(config, ""))))
    example = task.prepare_batch(task.example_batch(int(config.data.batch_size)))
    assert {k: (v.shape, v.dtype) for k, v in example.items()} == {k: (v.shape, v.dtype) for k, v in real.items()}


def test_corpus_summary_counts_the_rows_tokens():
    """The logged summary's token count is what the layout gives each document (the packer's input)."""
    config = resolve_config(_config())
    s = config.model.lm
    summary = lm.corpus_summary(config)
    tokenizer = lm.tokenizer_of(s)
    layout = lm.LMLayout(lm.layout_config(lm.vlm_config_from(s), s.grid, 2048),
                         lambda t: tokenizer.encode(t, add_special_tokens=False).ids)
    documents = lm.corpus_of(s)
    assert summary["tokens"] == sum(len(layout(d, None)["tokens"]) for d in documents)
    assert summary["documents"] == 300 and summary["vocab_size"] == 256


def test_digits_layout_fills_each_image_with_a_training_digit_of_its_class():
    """images 'digits': every image of a document is a train-split digit of the class it names (found by
    exact lookup among the split's pixels), scaled to 0..255 on RGB, in the document's image order."""
    from sklearn.datasets import load_digits

    from starflow2_jax.data.digits import digits_split_indices

    config = resolve_config(_config())
    s = config.model.lm
    task = lm.LMTask.from_config(config)
    tokenizer = lm.tokenizer_of(s)
    layout = lm.LMLayout(task.layout, lambda t: tokenizer.encode(t, add_special_tokens=False).ids, lm.digits_pool())
    digits = load_digits()
    train = digits_split_indices()["train"]
    lookup = {np.rint(digits.images[i] * 255 / 16).astype(np.uint8).tobytes(): int(digits.target[i]) for i in train}
    rng = np.random.default_rng(0)
    documents = [d for d in lm.corpus_of(s) if len(d.digits) >= 2][:20]
    assert documents
    for document in documents:
        pixels = layout(document, rng)["pixels"]
        assert pixels.dtype == np.uint8 and pixels.shape == (len(document.digits), 8, 8, 3)
        assert np.array_equal(pixels[..., 0], pixels[..., 2])
        assert [lookup[p[..., 0].tobytes()] for p in pixels] == list(document.digits)


def test_augment_digit_is_scipys_zero_filled_shift_then_bounded_noise():
    from scipy import ndimage

    image = np.random.default_rng(3).integers(0, 17, (8, 8)).astype(np.float64)
    for seed in range(12):
        dy, dx = np.random.default_rng(seed).integers(-2, 3, size=2)
        shifted = lm.augment_digit(image, np.random.default_rng(seed), shift=2)
        np.testing.assert_array_equal(shifted, ndimage.shift(image, (dy, dx), order=0, cval=0.0))
    noisy = lm.augment_digit(image, np.random.default_rng(0), noise=True)
    assert np.all(np.abs(noisy - image) <= 0.5) and noisy.min() >= 0 and noisy.max() <= 16
    assert 0 < np.abs(noisy - image).mean() < 0.5
    np.testing.assert_array_equal(lm.augment_digit(image[..., None], np.random.default_rng(0)), image)

"""The digits builder + grain pipeline against scikit-learn's arrays; sharding across simulated processes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from starflow2_jax.data import (DIGIT_NAMES, DIGITS_LEVELS, NUM_CLASSES, ImagePreprocess, build_digits,
                                digit_captions, digits_split_indices, make_pipeline)

CLEAN = ImagePreprocess(levels=DIGITS_LEVELS)
# sha256 of the test split's int64 indices: a change means scikit-learn changed its split algorithm.
TEST_SPLIT_SHA256 = "1d5d813b610838c5fa62ef6126ba0034dcb83c4b9406072a88f3d333bf923c40"


def _collect(dataset, num_batches=None):
    """Concatenates ``num_batches`` batches (or all) of ``dataset`` into one dict of arrays."""
    iterator = iter(dataset)
    batches = [next(iterator) for _ in range(num_batches)] if num_batches else list(iterator)
    return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}


def test_split_is_fixed_stratified_and_complete(sklearn_digits):
    _, targets = sklearn_digits
    split = digits_split_indices()
    assert len(split["train"]) == 1500 and len(split["test"]) == 297
    assert np.array_equal(np.sort(np.concatenate([split["train"], split["test"]])), np.arange(1797))
    assert hashlib.sha256(split["test"].astype("<i8").tobytes()).hexdigest() == TEST_SPLIT_SHA256
    expected = np.bincount(targets) * 297 / 1797
    assert np.all(np.abs(np.bincount(targets[split["test"]], minlength=NUM_CLASSES) - expected) <= 1)


def test_builder_is_idempotent_and_stores_the_exact_levels(digits_builder, sklearn_digits):
    images, targets = sklearn_digits
    again = build_digits(Path(digits_builder.data_dir).parents[1])  # DATA_DIR/starflow2_digits/1.0.0
    assert again.info.splits["train"].num_examples == 1500
    source = digits_builder.as_data_source("test")
    indices = digits_split_indices()["test"]
    for position in (0, 1, 150, 296):
        example = source[position]
        assert example["index"] == indices[position]
        assert example["image"].dtype == np.uint8 and example["image"].shape == (8, 8, 1)
        assert np.array_equal(example["image"][..., 0], images[indices[position]])
        assert example["label"] == targets[indices[position]]
        assert [caption.decode() for caption in example["captions"]] == digit_captions(example["label"])


@pytest.mark.parametrize("split, batch_size", [("train", 50), ("test", 33)])
def test_pipeline_returns_sklearn_digits_exactly(digits_builder, sklearn_digits, split, batch_size):
    images, targets = sklearn_digits
    indices = digits_split_indices()[split]
    data = _collect(make_pipeline(digits_builder.as_data_source(split), batch_size=batch_size, seed=0,
                                  shuffle=False, preprocess=CLEAN, num_epochs=1, process_index=0, process_count=1))
    assert np.array_equal(data["index"], indices)  # every example once, in the stored (sorted) order
    assert data["image"].dtype == np.float32 and data["image"].shape == (len(indices), 8, 8, 1)
    assert np.array_equal(data["image"][..., 0], images[indices].astype(np.float32) / 8 - 1)
    assert np.array_equal(np.rint((data["image"][..., 0] + 1) * 8).astype(np.int64), images[indices])
    assert data["label"].dtype == np.int32 and np.array_equal(data["label"], targets[indices])
    for caption, label in zip(data["caption"], targets[indices]):
        assert DIGIT_NAMES[label] in caption or str(label) in caption


def test_two_processes_get_disjoint_shards_covering_each_epoch(digits_builder):
    source = digits_builder.as_data_source("train")
    preprocess = ImagePreprocess(levels=DIGITS_LEVELS, noise="uniform")
    kwargs = dict(batch_size=50, seed=3, shuffle=True, preprocess=preprocess, num_epochs=2)
    shards = [_collect(make_pipeline(source, process_index=rank, process_count=2, **kwargs)) for rank in (0, 1)]
    whole = _collect(make_pipeline(source, process_index=0, process_count=1, **kwargs))
    steps = 1500 // 50
    assert all(len(shard["index"]) == 2 * steps * 25 for shard in shards)
    for epoch in range(2):
        part = slice(epoch * steps * 25, (epoch + 1) * steps * 25)
        first, second = shards[0]["index"][part], shards[1]["index"][part]
        assert not set(first) & set(second)
        assert np.array_equal(np.sort(np.concatenate([first, second])), digits_split_indices()["train"])
    assert not np.array_equal(shards[0]["index"][: steps * 25], shards[0]["index"][steps * 25:])  # reshuffled
    # The global stream (order and noise) does not depend on the number of processes.
    for step in range(2 * steps):
        local = [slice(step * 25, (step + 1) * 25), slice(step * 50, (step + 1) * 50)]
        merged = {key: np.concatenate([shard[key][local[0]] for shard in shards]) for key in ("index", "image")}
        order, global_order = np.argsort(merged["index"]), np.argsort(whole["index"][local[1]])
        assert np.array_equal(merged["index"][order], whole["index"][local[1]][global_order])
        assert np.array_equal(merged["image"][order], whole["image"][local[1]][global_order])


def test_iterator_state_resumes_exactly(digits_builder):
    preprocess = ImagePreprocess(levels=DIGITS_LEVELS, noise="uniform", label_dropout=0.5, caption_dropout=0.5)
    dataset = make_pipeline(digits_builder.as_data_source("train"), batch_size=50, seed=7, shuffle=True,
                            preprocess=preprocess, process_index=1, process_count=2)
    iterator = iter(dataset)
    for _ in range(7):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(40)]  # crosses the epoch boundary (30 steps per epoch)
    resumed = iter(dataset)
    resumed.set_state(state)
    for want, got in zip(expected, [next(resumed) for _ in range(40)]):
        assert want.keys() == got.keys()
        for key in want:
            assert np.array_equal(want[key], got[key]), key


def test_uniform_dequantisation_fills_each_bin(digits_builder, sklearn_digits):
    images, _ = sklearn_digits
    preprocess = ImagePreprocess(levels=DIGITS_LEVELS, noise="uniform")
    data = _collect(make_pipeline(digits_builder.as_data_source("train"), batch_size=50, seed=1, shuffle=True,
                                  preprocess=preprocess, num_epochs=1, process_index=0, process_count=1))
    clean = images[data["index"]].astype(np.float64) / 8 - 1  # (N, 8, 8)
    offset = data["image"][..., 0].astype(np.float64) - clean
    # The bin of x is [x - 1/16, x + 1/16); float32 rounding may land exactly on the upper edge.
    assert offset.min() >= -1 / 16 and offset.max() <= 1 / 16
    u = offset * 8 + 0.5  # should be U[0, 1)
    assert abs(u.mean() - 0.5) < 3e-3 and abs(u.var() - 1 / 12) < 2e-3
    assert np.all(np.abs(np.histogram(u, bins=8, range=(0, 1))[0] / u.size - 1 / 8) < 4e-3)


def test_gaussian_noise_has_the_configured_scale(digits_builder, sklearn_digits):
    images, _ = sklearn_digits
    preprocess = ImagePreprocess(levels=DIGITS_LEVELS, noise="gaussian", noise_std=0.05)
    data = _collect(make_pipeline(digits_builder.as_data_source("train"), batch_size=50, seed=1, shuffle=False,
                                  preprocess=preprocess, num_epochs=1, process_index=0, process_count=1))
    noise = data["image"][..., 0] - (images[data["index"]] / 8 - 1)
    assert abs(noise.mean()) < 1e-3 and abs(noise.std() - 0.05) < 1e-3


def test_label_and_caption_dropout_rates(digits_builder, sklearn_digits):
    _, targets = sklearn_digits
    preprocess = ImagePreprocess(levels=DIGITS_LEVELS, label_dropout=0.3, caption_dropout=0.2)
    data = _collect(make_pipeline(digits_builder.as_data_source("train"), batch_size=50, seed=2, shuffle=True,
                                  preprocess=preprocess, num_epochs=3, process_index=0, process_count=1))
    dropped = data["label"] == -1
    assert abs(dropped.mean() - 0.3) < 0.025
    assert np.array_equal(data["label"][~dropped], targets[data["index"][~dropped]])
    assert abs((data["caption"] == "").mean() - 0.2) < 0.025
    kept = data["caption"] != ""
    templates = np.array([digit_captions(label).index(caption)
                          for caption, label in zip(data["caption"][kept], targets[data["index"][kept]])])
    assert np.all(np.abs(np.bincount(templates) / templates.size - 1 / 6) < 0.02)  # captions picked uniformly


def test_pad_remainder_covers_the_split_on_every_process(digits_builder, sklearn_digits):
    images, targets = sklearn_digits
    indices = digits_split_indices()["test"]
    shards = [_collect(make_pipeline(digits_builder.as_data_source("test"), batch_size=64, seed=0, shuffle=False,
                                     preprocess=CLEAN, num_epochs=1, process_index=rank, process_count=2,
                                     drop_remainder=False, pad_remainder=True)) for rank in (0, 1)]
    assert [len(shard["index"]) for shard in shards] == [160, 160]  # 297 → 5 global batches of 64
    valid = np.concatenate([shard["valid"] for shard in shards])
    index = np.concatenate([shard["index"] for shard in shards])
    assert valid.sum() == 297 and np.array_equal(np.sort(index[valid]), indices)
    assert np.all(index[~valid] == -1)
    for shard in shards:
        padding = ~shard["valid"]
        assert np.all(shard["image"][padding] == 0) and np.all(shard["label"][padding] == -1)
        assert np.all(shard["caption"][padding] == "")
        real = shard["valid"]
        assert np.array_equal(shard["label"][real], targets[shard["index"][real]])
        assert np.array_equal(shard["image"][real][..., 0], images[shard["index"][real]] / 8 - 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=51, process_count=2), "not divisible by process_count 2"),
    (dict(process_index=2, process_count=2), "process_index 2"),
    (dict(seed=-1), "seed -1"),
    (dict(num_epochs=0), "num_epochs 0"),
    (dict(pad_remainder=True), "exclude each other"),
    (dict(batch_size=5000), "fewer than one global batch of 5000"),
    (dict(preprocess="clean"), "not callable"),
])
def test_make_pipeline_rejects_bad_arguments(digits_builder, kwargs, match):
    arguments = dict(batch_size=50, seed=0, shuffle=True, preprocess=CLEAN, process_index=0, process_count=1)
    with pytest.raises(ValueError, match=match):
        make_pipeline(digits_builder.as_data_source("train"), **{**arguments, **kwargs})


@pytest.mark.parametrize("kwargs, match", [
    (dict(levels=0), "levels 0"),
    (dict(levels=16, noise="salt"), "noise 'salt'"),
    (dict(levels=16, noise="gaussian"), "noise_std 0.0"),
    (dict(levels=16, noise_std=0.1), "only used with noise='gaussian'"),
    (dict(levels=16, label_dropout=1.5), "label_dropout 1.5"),
])
def test_image_preprocess_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImagePreprocess(**kwargs)


def test_digit_captions_name_the_digit():
    assert digit_captions(7)[0] == "a handwritten digit seven"
    assert "an eight" in digit_captions(8)[3]
    with pytest.raises(ValueError, match="digit label 10"):
        digit_captions(10)


@pytest.mark.slow
def test_worker_processes_give_the_same_stream_and_resume(digits_builder):
    """mp_prefetch (worker_count > 0) yields the in-process stream and restores from its state (~10 s)."""
    preprocess = ImagePreprocess(levels=DIGITS_LEVELS, noise="uniform", label_dropout=0.5)
    kwargs = dict(batch_size=50, seed=7, shuffle=True, preprocess=preprocess, process_index=0, process_count=2)
    source = digits_builder.as_data_source("train")
    reference = iter(make_pipeline(source, **kwargs))
    expected = [next(reference) for _ in range(8)]
    dataset = make_pipeline(source, worker_count=2, **kwargs)
    iterator = iter(dataset)
    first = [next(iterator) for _ in range(3)]
    state = iterator.get_state()
    rest = [next(iterator) for _ in range(5)]
    resumed = iter(dataset)
    resumed.set_state(state)
    again = [next(resumed) for _ in range(5)]
    for want, got in zip(expected + rest, first + rest + again):
        assert all(np.array_equal(want[key], got[key]) for key in want)

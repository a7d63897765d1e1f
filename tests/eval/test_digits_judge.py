"""DigitsJudge against real data: the real held-out digits must score like real digits, and the
failure modes it exists to catch (wrong class, collapse, copying) must show."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from starflow2_jax.data import digits_split_indices
from starflow2_jax.eval.digits import COLLAPSE_RATIO, DigitsJudge, mean_pairwise_distance, to_levels


@pytest.fixture(scope="module")
def judge() -> DigitsJudge:
    return DigitsJudge()


@pytest.fixture(scope="module")
def real_test():
    digits = load_digits()
    index = digits_split_indices()["test"]
    return digits.images[index].astype(np.uint8), digits.target[index]


def test_classifier_recognises_real_held_out_digits(judge, real_test):
    images, labels = real_test
    assert judge.test_accuracy >= 0.98
    result = judge.judge(images, labels)
    assert result["accuracy"] == pytest.approx(judge.test_accuracy)
    assert result["num_samples"] == len(labels) == 297
    assert sorted(result["per_class_accuracy"]) == [str(c) for c in range(10)]
    confusion = np.asarray(result["confusion"])
    assert confusion.sum() == 297 and np.trace(confusion) == round(result["accuracy"] * 297)
    np.testing.assert_array_equal(confusion.sum(axis=1), np.bincount(labels, minlength=10))


def test_real_held_out_digits_are_as_varied_and_novel_as_real_data(judge, real_test):
    images, labels = real_test
    result = judge.judge(images, labels)
    for ratio in result["variety"]["per_class"].values():
        assert 0.85 < ratio < 1.2
    assert result["variety"]["mean_ratio"] == pytest.approx(1.0, abs=0.06)
    assert result["variety"]["collapsed"] == []
    assert result["novelty"]["mean_ratio"] == pytest.approx(1.0)


def test_float_pixels_in_minus_one_one_match_integer_levels(judge, real_test):
    images, labels = real_test
    x = images.astype(np.float32)[..., None] / 8.0 - 1.0  # the pipeline's scaling, (N, 8, 8, 1)
    x = x + np.random.default_rng(0).uniform(-1 / 16, 1 / 16, x.shape).astype(np.float32) * 0.99  # dequantised
    np.testing.assert_array_equal(to_levels(x), images.reshape(-1, 64))
    assert judge.judge(x, labels) == judge.judge(images, labels)


def test_one_digit_repeated_has_zero_variety(judge, real_test):
    images, labels = real_test
    three = images[np.flatnonzero(labels == 3)[0]]
    result = judge.judge(np.repeat(three[None], 30, axis=0), np.full(30, 3))
    assert result["variety"]["per_class"]["3"] == pytest.approx(0.0, abs=1e-6)
    assert result["variety"]["collapsed"] == [3]
    assert result["accuracy"] in (0.0, 1.0)
    assert 0.0 < COLLAPSE_RATIO < 0.85


def test_shuffled_labels_get_low_accuracy(judge, real_test):
    images, labels = real_test
    shuffled = np.random.default_rng(0).permutation(labels)
    assert judge.judge(images, shuffled)["accuracy"] < 0.25


def test_copied_training_digits_have_zero_novelty(judge):
    result = judge.judge(judge.train_x.astype(np.int64)[:200], judge.train_y[:200])
    assert result["novelty"]["mean_ratio"] == pytest.approx(0.0, abs=1e-6)
    assert result["accuracy"] == 1.0


def test_mean_pairwise_distance_matches_brute_force():
    x = np.random.default_rng(1).normal(size=(7, 5))
    brute = np.mean([np.linalg.norm(x[i] - x[j]) for i in range(7) for j in range(i + 1, 7)])
    assert mean_pairwise_distance(x) == pytest.approx(brute)
    assert np.isnan(mean_pairwise_distance(x[:1]))


@pytest.mark.parametrize("bad, match", [
    (np.full((2, 8, 8), 17, np.uint8), "grey levels 0..16"),
    (np.zeros((2, 7, 8)), "expected digits of shape"),
])
def test_bad_pixels_are_named(judge, bad, match):
    with pytest.raises(ValueError, match=match):
        judge.judge(bad, np.zeros(2, np.int64))


def test_non_finite_samples_count_as_wrong(judge, real_test):
    images, labels = real_test
    x = images[:40].astype(np.float32) / 8.0 - 1.0
    x[:4, 2, 3] = np.nan
    x[4, 0, 0] = np.inf
    result = judge.judge(x, labels[:40])
    clean = judge.judge(images[5:40], labels[5:40])
    assert result["nonfinite"] == 5 and clean["nonfinite"] == 0
    assert result["accuracy"] == pytest.approx(clean["accuracy"] * 35 / 40)
    assert np.asarray(result["confusion"]).sum() == 35
    assert result["variety"]["mean_ratio"] == pytest.approx(clean["variety"]["mean_ratio"])
    assert np.isnan(judge.judge(np.full((3, 64), np.nan), np.zeros(3))["novelty"]["mean_ratio"])
    with pytest.raises(ValueError, match="non-finite"):
        to_levels(x)


def test_bad_labels_are_named(judge, real_test):
    images, _ = real_test
    with pytest.raises(ValueError, match="labels must be digits"):
        judge.judge(images[:2], np.array([0, 10]))
    with pytest.raises(ValueError, match="2 samples but 3 labels"):
        judge.judge(images[:2], np.zeros(3))

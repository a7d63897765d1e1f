"""``DigitsJudge``: how good are generated 8×8 digits? A classifier and variety statistics built
from the *real* scikit-learn digits (the fixed split of ``starflow2_jax.data.digits_split_indices``).

- **Recognition**: an RBF SVC (γ = 0.256 on pixels scaled to [0, 1], which is scikit-learn's
  classic γ = 0.001 on the raw 0..16 levels; C = 10) trained on the 1500 real training digits
  only. ``test_accuracy`` is its accuracy on the 297 real held-out digits (≈ 99.3%), the yardstick
  for the accuracy on generated digits: the share recognised as the *requested* class.
- **Within-class variety**: for each class, the mean pairwise Euclidean distance between samples
  of that class, divided by the same statistic over the real training digits of that class. A
  ratio ≈ 1 means as varied as the real digits; ≪ 1 means mode collapse (one digit repeated → 0).
- **Novelty**: each sample's distance to its nearest real training digit of the same class,
  averaged, divided by the same statistic for the real *test* digits. ≈ 1: samples are as far from
  the training set as unseen real digits are; ≪ 1: the model copies training digits.

Pixels: integer arrays are grey levels 0..16 (the stored digits); float arrays are model outputs
x ∈ [−1, 1] with x = v/8 − 1, mapped back and rounded to the nearest level (the data's grid), so
samples and real digits are compared on the same 17 levels. Distances are computed on v/16 ∈ [0, 1].
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from starflow2_jax.data.digits import DIGITS_LEVELS, NUM_CLASSES, digits_split_indices

COLLAPSE_RATIO = 0.5  # a class whose variety ratio is below this is flagged as collapsed
SVC_GAMMA = 0.001 * DIGITS_LEVELS**2  # the classic γ on raw 0..16 levels, for pixels scaled to [0, 1]
SVC_C = 10.0


def to_levels(samples: Any) -> np.ndarray:
    """(N, 64) float64 grey levels in [0, 16] (integers) from (N, 8, 8[, 1]) or (N, 64) digits.

    Integer input: levels 0..16 as stored (values outside raise). Float input: x ∈ [−1, 1] →
    round(clip((x + 1)·8, 0, 16)); non-finite values raise.
    """
    a = np.asarray(samples)
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[1:] == (8, 8):
        a = a.reshape(len(a), 64)
    if a.ndim != 2 or a.shape[1] != 64:
        raise ValueError(f"expected digits of shape (N, 8, 8), (N, 8, 8, 1) or (N, 64), got {np.asarray(samples).shape}")
    if np.issubdtype(a.dtype, np.integer) or a.dtype == bool:
        if a.size and (a.min() < 0 or a.max() > DIGITS_LEVELS):
            raise ValueError(f"integer digits must be grey levels 0..{DIGITS_LEVELS}, got values in "
                             f"[{a.min()}, {a.max()}] (pass model outputs in [-1, 1] as floats)")
        return a.astype(np.float64)
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"expected integer levels or float pixels in [-1, 1], got dtype {a.dtype}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{int(np.sum(~np.isfinite(a)))} non-finite pixel values in the samples")
    half = DIGITS_LEVELS / 2
    return np.rint(np.clip((a.astype(np.float64) + 1.0) * half, 0, DIGITS_LEVELS))


def mean_pairwise_distance(x: np.ndarray) -> float:
    """Mean Euclidean distance over all unordered pairs of rows of ``x`` (N, D); NaN when N < 2."""
    n = len(x)
    if n < 2:
        return float("nan")
    sq = np.sum(x * x, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
    iu = np.triu_indices(n, k=1)
    return float(np.mean(np.sqrt(d2[iu])))


def nearest_distance(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(N,) Euclidean distance from each row of ``x`` to its nearest row of ``reference``."""
    d2 = np.sum(x * x, 1)[:, None] + np.sum(reference * reference, 1)[None, :] - 2.0 * x @ reference.T
    return np.sqrt(np.maximum(d2.min(axis=1), 0.0))


@functools.lru_cache(maxsize=1)
def _real_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    split = digits_split_indices()
    x, y = digits.data.astype(np.float64), digits.target.astype(np.int64)
    return x[split["train"]], y[split["train"]], x[split["test"]], y[split["test"]]


class DigitsJudge:
    """Scores generated digits against the real ones (see the module docstring).

    Attributes: ``test_accuracy`` (the classifier on the real held-out digits), ``real_variety``
    (10,) mean within-class pairwise distance of the real training digits, ``real_novelty`` (10,)
    mean nearest-training-digit distance of the real test digits per class.
    """

    def __init__(self):
        from sklearn.svm import SVC

        self.train_x, self.train_y, self.test_x, self.test_y = _real_digits()
        self.classifier = SVC(gamma=SVC_GAMMA, C=SVC_C).fit(self._features(self.train_x), self.train_y)
        scaled, test_scaled = self._features(self.train_x), self._features(self.test_x)
        self.test_accuracy = float(np.mean(self.classifier.predict(test_scaled) == self.test_y))
        self.real_variety = np.array([mean_pairwise_distance(scaled[self.train_y == c]) for c in range(NUM_CLASSES)])
        self.real_novelty = np.array([
            nearest_distance(test_scaled[self.test_y == c], scaled[self.train_y == c]).mean()
            for c in range(NUM_CLASSES)])

    @staticmethod
    def _features(levels: np.ndarray) -> np.ndarray:
        return levels / DIGITS_LEVELS

    def predict(self, samples: Any) -> np.ndarray:
        """(N,) predicted digit of each sample (see ``to_levels`` for the accepted pixels)."""
        return self.classifier.predict(self._features(to_levels(samples))).astype(np.int64)

    def judge(self, samples: Any, labels: Any) -> dict:
        """Scores ``samples`` (N digits, see ``to_levels``) generated for the requested ``labels`` (N,).

        Returns a JSON-ready dict:
          num_samples; nonfinite; accuracy (share predicted as the requested label); per_class_accuracy
          {digit: acc} (classes present only); confusion (10×10 list, rows = requested, columns =
          predicted); variety {per_class {digit: ratio}, mean_ratio, sample_distance {digit},
          real_distance {digit}, collapsed [digits with ratio < COLLAPSE_RATIO]}; novelty
          {per_class {digit: ratio}, mean_ratio}; classifier_test_accuracy.
        Non-finite samples (a diverged sampler) count as wrong (``nonfinite``: how many) and are
        left out of confusion, variety and novelty. Variety needs ≥ 2 finite samples of a class;
        classes with fewer are left out of it.
        """
        samples = np.asarray(samples)
        finite = np.ones(len(samples), bool)
        if np.issubdtype(samples.dtype, np.floating):
            finite = np.isfinite(samples.reshape(len(samples), -1)).all(axis=1)
        levels = to_levels(np.where(finite.reshape((-1,) + (1,) * (samples.ndim - 1)), samples, 0.0)
                           if not finite.all() else samples)
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        if len(labels) != len(levels):
            raise ValueError(f"{len(levels)} samples but {len(labels)} labels")
        if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            raise ValueError(f"labels must be digits 0..{NUM_CLASSES - 1}, got values in [{labels.min()}, {labels.max()}]")
        if not len(levels):
            raise ValueError("no samples to judge")
        predicted = self.classifier.predict(self._features(levels)).astype(np.int64)
        predicted[~finite] = -1  # never the requested class
        confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
        np.add.at(confusion, (labels[finite], predicted[finite]), 1)
        features = self._features(levels)
        train = self._features(self.train_x)
        per_class_acc, variety, sample_dist, novelty = {}, {}, {}, {}
        for c in np.unique(labels):
            per_class_acc[str(c)] = float(np.mean(predicted[labels == c] == c))
            mask = (labels == c) & finite
            if not mask.any():
                continue
            nearest = nearest_distance(features[mask], train[self.train_y == c]).mean()
            novelty[str(c)] = float(nearest / self.real_novelty[c])
            if mask.sum() >= 2:
                sample_dist[str(c)] = mean_pairwise_distance(features[mask])
                variety[str(c)] = sample_dist[str(c)] / float(self.real_variety[c])
        return {
            "num_samples": int(len(levels)),
            "nonfinite": int(np.sum(~finite)),
            "accuracy": float(np.mean(predicted == labels)),
            "per_class_accuracy": per_class_acc,
            "confusion": confusion.tolist(),
            "variety": {
                "per_class": variety,
                "mean_ratio": float(np.mean(list(variety.values()))) if variety else float("nan"),
                "sample_distance": sample_dist,
                "real_distance": {k: float(self.real_variety[int(k)]) for k in sample_dist},
                "collapsed": [int(k) for k, v in variety.items() if v < COLLAPSE_RATIO],
            },
            "novelty": {"per_class": novelty,
                        "mean_ratio": float(np.mean(list(novelty.values()))) if novelty else float("nan")},
            "classifier_test_accuracy": self.test_accuracy,
        }

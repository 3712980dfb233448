"""Metrics: the vectorised bootstrap agrees with scikit-learn; intervals are sane; degenerate resamples."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from wsi_mil.cohort.metrics import _resampled, bootstrap_metrics, format_metrics_table, point_metrics


def _data(n: int, k: int, seed: int = 0, signal: float = 1.5):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += signal
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


@pytest.mark.parametrize("k", [2, 3])
def test_vectorised_resamples_equal_sklearn(k):
    y, p = _data(40, k, seed=k)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, len(y), size=(25, len(y)))
    got = _resampled(y, p, idx)
    for b in range(len(idx)):
        yb, pb = y[idx[b]], p[idx[b]]
        pred = pb.argmax(1)
        assert got["accuracy"][b] == pytest.approx(accuracy_score(yb, pred))
        assert got["f1_macro"][b] == pytest.approx(f1_score(yb, pred, average="macro", zero_division=0))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert got["balanced_accuracy"][b] == pytest.approx(balanced_accuracy_score(yb, pred))
        if len(np.unique(yb)) == k:
            expected = roc_auc_score(yb, pb[:, 1]) if k == 2 else roc_auc_score(yb, pb, multi_class="ovr", labels=list(range(k)))
            assert got["auc"][b] == pytest.approx(expected)
        else:
            assert np.isnan(got["auc"][b])


def test_point_estimates_and_intervals():
    y, p = _data(200, 2, seed=3)
    m = bootstrap_metrics(y, p, n_bootstrap=500, seed=0)
    assert m["auc"]["value"] == pytest.approx(roc_auc_score(y, p[:, 1]))
    for name in ("auc", "accuracy", "balanced_accuracy", "f1_macro"):
        assert m[name]["ci_low"] < m[name]["value"] < m[name]["ci_high"]
        assert m[name]["n_valid"] == 500
    assert m["n_slides"] == 200 and sum(m["class_counts"]) == 200
    # the interval narrows with more slides and is reproducible for a seed
    y2, p2 = _data(2000, 2, seed=3)
    big = bootstrap_metrics(y2, p2, n_bootstrap=200, seed=0)
    assert big["auc"]["ci_high"] - big["auc"]["ci_low"] < m["auc"]["ci_high"] - m["auc"]["ci_low"]
    assert bootstrap_metrics(y, p, n_bootstrap=500, seed=0) == m


def test_resamples_with_one_class_are_left_out_of_the_auc_interval():
    y = np.array([0, 0, 0, 0, 1])
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.2, 0.8]])
    m = bootstrap_metrics(y, p, n_bootstrap=1000, seed=0)
    assert m["auc"]["value"] == 1.0
    # P(no positive in a resample of 5) = 0.8**5 ~ 0.33
    assert 550 < m["auc"]["n_valid"] < 780
    assert m["accuracy"]["n_valid"] == 1000


def test_undefined_auc_is_none_and_table_prints_na():
    m = bootstrap_metrics(np.array([1, 1, 1]), np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]]), n_bootstrap=50)
    assert m["auc"]["value"] is None and m["auc"]["ci_low"] is None and m["auc"]["n_valid"] == 0
    assert point_metrics(np.array([1, 1, 1]), np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]]))["accuracy"] == pytest.approx(2 / 3)
    table = format_metrics_table([("fold 0", m)])
    assert "n/a" in table and "0.667" in table

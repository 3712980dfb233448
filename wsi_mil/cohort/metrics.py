"""Slide-level metrics with bootstrap confidence intervals.

Point estimates come from scikit-learn: AUC (binary: of class index 1; multi-class: macro one-vs-rest),
accuracy, balanced accuracy and macro F1 of the arg-max prediction. The intervals are percentile
bootstrap intervals over slides (``n_bootstrap`` resamples with a fixed seed), computed vectorised with
the same definitions (checked against scikit-learn in the tests). A resample in which a metric is
undefined (AUC of a resample holding a single class) is left out of that metric's interval, and
``n_valid`` says how many resamples were used; an undefined point estimate is ``None`` (JSON null).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["METRIC_NAMES", "bootstrap_metrics", "format_metrics_table", "point_metrics"]

METRIC_NAMES = ("auc", "accuracy", "balanced_accuracy", "f1_macro")
_MAX_CELLS = 4_000_000  # resamples x slides per vectorised chunk


def _validate(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0] or p.shape[1] < 2:
        raise ValueError(f"probabilities must be [n, K>=2] for {y.shape[0]} labels, got {p.shape}")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must be class indices in [0, {p.shape[1]})")
    return y, p / p.sum(axis=1, keepdims=True).clip(min=np.finfo(np.float64).tiny)


def point_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """scikit-learn's AUC, accuracy, balanced accuracy and macro F1 (NaN when undefined)."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

    y, p = _validate(labels, probabilities)
    if y.size == 0:
        return {name: float("nan") for name in METRIC_NAMES}
    k = p.shape[1]
    pred = p.argmax(axis=1)
    auc = float("nan")
    if len(np.unique(y)) == k:  # every class present (binary: both), else undefined
        auc = float(roc_auc_score(y, p[:, 1]) if k == 2 else roc_auc_score(y, p, multi_class="ovr", labels=list(range(k))))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true" for tiny folds
        balanced = float(balanced_accuracy_score(y, pred))
    return {
        "auc": auc,
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": balanced,
        "f1_macro": float(f1_score(y, pred, average="macro", zero_division=0)),
    }


def _rank_auc(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Row-wise Mann-Whitney AUC (ties averaged) of ``scores [B, n]`` for ``positive [B, n]``; NaN
    where a row has no positive or no negative."""
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=1)
    n_pos = positive.sum(axis=1)
    n_neg = positive.shape[1] - n_pos
    rank_sum = np.where(positive, ranks, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def _resampled(y: np.ndarray, p: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric for each row of resample indices ``idx [B, n]`` (vectorised)."""
    k = p.shape[1]
    yb = y[idx]
    pred = p.argmax(axis=1)[idx]
    correct = yb == pred
    n_true = np.stack([(yb == c).sum(axis=1) for c in range(k)], axis=1)  # [B, K]
    n_pred = np.stack([(pred == c).sum(axis=1) for c in range(k)], axis=1)
    tp = np.stack([((yb == c) & correct).sum(axis=1) for c in range(k)], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(n_true > 0, tp / np.maximum(n_true, 1), np.nan)
        balanced = np.nanmean(np.where(n_true > 0, recall, np.nan), axis=1)
        present = (n_true + n_pred) > 0
        f1 = np.where(present, 2.0 * tp / np.maximum(n_true + n_pred, 1), np.nan)
        f1_macro = np.nanmean(f1, axis=1)
    if k == 2:
        auc = _rank_auc(p[:, 1][idx], yb == 1)
    else:
        per_class = np.stack([_rank_auc(p[:, c][idx], yb == c) for c in range(k)], axis=1)
        auc = np.where(np.isnan(per_class).any(axis=1), np.nan, per_class.mean(axis=1))
    return {"auc": auc, "accuracy": correct.mean(axis=1), "balanced_accuracy": balanced, "f1_macro": f1_macro}


def _none_if_nan(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def bootstrap_metrics(
    labels: np.ndarray,
    probabilities: np.ndarray,
    n_bootstrap: int = 1000,
    ci_level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Point estimates and percentile-bootstrap intervals.

    Returns:
        ``{metric: {"value", "ci_low", "ci_high", "n_valid"}}`` for each of :data:`METRIC_NAMES`, plus
        ``n_slides``, ``class_counts`` (per class index) and ``n_bootstrap``. Undefined values are ``None``.
    """
    y, p = _validate(labels, probabilities)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows of nanmean
        point = point_metrics(y, p)
        samples: dict[str, list[np.ndarray]] = {name: [] for name in METRIC_NAMES}
        n = y.size
        if n > 0 and n_bootstrap > 0:
            rng = np.random.default_rng(seed)
            chunk = max(1, _MAX_CELLS // n)
            for start in range(0, n_bootstrap, chunk):
                idx = rng.integers(0, n, size=(min(chunk, n_bootstrap - start), n))
                for name, values in _resampled(y, p, idx).items():
                    samples[name].append(values)
    alpha = (1.0 - ci_level) / 2.0
    out: dict[str, Any] = {}
    for name in METRIC_NAMES:
        values = np.concatenate(samples[name]) if samples[name] else np.empty(0)
        finite = values[np.isfinite(values)]
        low = high = float("nan")
        if finite.size:
            low, high = (float(v) for v in np.quantile(finite, [alpha, 1.0 - alpha]))
        out[name] = {
            "value": _none_if_nan(point[name]),
            "ci_low": _none_if_nan(low),
            "ci_high": _none_if_nan(high),
            "n_valid": int(finite.size),
        }
    out["n_slides"] = int(y.size)
    out["class_counts"] = [int((y == c).sum()) for c in range(p.shape[1])]
    out["n_bootstrap"] = int(n_bootstrap)
    out["ci_level"] = float(ci_level)
    return out


def _cell(metric: dict[str, Any]) -> str:
    value = metric.get("value")
    if value is None:
        return "n/a"
    low, high = metric.get("ci_low"), metric.get("ci_high")
    if low is None or high is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def format_metrics_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """A plain-text table: one row per ``(name, bootstrap_metrics(...))``, value [CI] per metric."""
    header = ["", "n", *METRIC_NAMES]
    body = [[name, str(m.get("n_slides", "")), *(_cell(m[k]) for k in METRIC_NAMES)] for name, m in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *body]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])

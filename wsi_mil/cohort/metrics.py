"""Slide- and case-level metrics with bootstrap confidence intervals.

Point estimates come from scikit-learn: AUC (binary: of class index 1; multi-class: macro one-vs-rest),
accuracy, balanced accuracy and macro F1 of the arg-max prediction. The intervals are percentile
bootstrap intervals (``n_bootstrap`` resamples with a fixed seed), computed vectorised with the same
definitions (checked against scikit-learn in the tests). A resample in which a metric is undefined (AUC
of a resample holding a single class) is left out of that metric's interval, and ``n_valid`` says how
many resamples were used; an undefined point estimate is ``None`` (JSON null).

**What is resampled.** Slides of one case (patient) are correlated, so resampling slides as if they were
independent understates the uncertainty. Given ``groups`` (the case id of each slide),
:func:`bootstrap_metrics` resamples cases (a cluster bootstrap): each resample draws as many cases as
there are, uniformly with replacement, takes every slide of each drawn case (a case drawn twice counts
its slides twice) and computes the slide-level metric on those slides. Cases are numbered in sorted
order of their ids and drawn with ``rng.integers(0, n_cases, size=(B, n_cases))`` per chunk of ``B``
resamples; the metrics are computed with each slide weighted by how often its case was drawn, which
equals computing them on the concatenated slides. When every case holds one slide, resampling cases is
resampling slides and the slide bootstrap is used (the numbers of ``groups=None``). Without ``groups``
slides are resampled. The result's ``"resampled"`` says which unit was drawn (``"case"``/``"slide"``).

**Case-level metrics** (:func:`case_metrics`): a case's probability vector is the mean of its slides'
probability vectors (each slide counts once, whatever its tile count) and its label is its slides'
label; the point metrics and the bootstrap (each case one unit) are then computed over cases. Slides of
one case with different labels leave the case without a label: :func:`aggregate_cases` raises
:class:`~wsi_mil.errors.MixedCaseLabelError` naming the cases, and :func:`slide_and_case_metrics` (used
by ``wsi-mil train`` and ``predict``) reports the case-level metrics as undefined (``None``) with that
reason, keeping the slide-level ones (whose bootstrap still resamples cases).

One module because the slide and case bootstraps share the vectorised metric definitions (checked
together against scikit-learn) and the table prints both levels side by side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from wsi_mil.errors import MixedCaseLabelError

__all__ = [
    "CASE_PROBABILITY",
    "METRIC_NAMES",
    "CaseAggregate",
    "aggregate_cases",
    "bootstrap_metrics",
    "case_metrics",
    "describe_statistics",
    "format_metrics_table",
    "point_metrics",
    "slide_and_case_metrics",
]

#: How a case's probability is made from its slides' (also written into metrics.json).
CASE_PROBABILITY = "mean of the case's slide probabilities"

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


def _from_counts(n_true: np.ndarray, n_pred: np.ndarray, tp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Balanced accuracy and macro F1 of each row of per-class counts ``[B, K]``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(n_true > 0, tp / np.maximum(n_true, 1), np.nan)
        balanced = np.nanmean(np.where(n_true > 0, recall, np.nan), axis=1)
        present = (n_true + n_pred) > 0
        f1 = np.where(present, 2.0 * tp / np.maximum(n_true + n_pred, 1), np.nan)
        f1_macro = np.nanmean(f1, axis=1)
    return balanced, f1_macro


def _macro_auc(k: int, auc_of_class: Any) -> np.ndarray:
    if k == 2:
        return np.asarray(auc_of_class(1))
    per_class = np.stack([auc_of_class(c) for c in range(k)], axis=1)
    return np.where(np.isnan(per_class).any(axis=1), np.nan, per_class.mean(axis=1))


def _resampled(y: np.ndarray, p: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric for each row of resample indices ``idx [B, n]`` (vectorised)."""
    k = p.shape[1]
    yb = y[idx]
    pred = p.argmax(axis=1)[idx]
    correct = yb == pred
    n_true = np.stack([(yb == c).sum(axis=1) for c in range(k)], axis=1)  # [B, K]
    n_pred = np.stack([(pred == c).sum(axis=1) for c in range(k)], axis=1)
    tp = np.stack([((yb == c) & correct).sum(axis=1) for c in range(k)], axis=1)
    balanced, f1_macro = _from_counts(n_true, n_pred, tp)
    auc = _macro_auc(k, lambda c: _rank_auc(p[:, c][idx], yb == c))
    return {"auc": auc, "accuracy": correct.mean(axis=1), "balanced_accuracy": balanced, "f1_macro": f1_macro}


def _weighted_auc(scores: np.ndarray, positive: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC (ties count one half) of ``scores [n]`` for ``positive [n]`` with each slide
    counted ``w [B, n]`` times in row b; NaN where a row has no positive or no negative weight."""
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first slide of each distinct score
    ws = w[:, order]
    pos = positive[order]
    pos_level = np.add.reduceat(np.where(pos, ws, 0.0), starts, axis=1)  # [B, distinct scores]
    neg_level = np.add.reduceat(np.where(pos, 0.0, ws), starts, axis=1)
    neg_below = np.cumsum(neg_level, axis=1) - neg_level
    n_pos, n_neg = pos_level.sum(axis=1), neg_level.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos_level * (neg_below + 0.5 * neg_level)).sum(axis=1) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def _resampled_weighted(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric for each row of slide multiplicities ``w [B, n]`` (row b: slide i taken ``w[b, i]``
    times), equal to :func:`_resampled` on the concatenated slides (vectorised)."""
    k = p.shape[1]
    pred = p.argmax(axis=1)
    correct = (y == pred).astype(np.float64)
    true_1h = np.eye(k)[y]  # [n, K]
    n_true = w @ true_1h
    n_pred = w @ np.eye(k)[pred]
    tp = w @ (true_1h * correct[:, None])
    balanced, f1_macro = _from_counts(n_true, n_pred, tp)
    auc = _macro_auc(k, lambda c: _weighted_auc(p[:, c], y == c, w))
    return {"auc": auc, "accuracy": (w @ correct) / w.sum(axis=1), "balanced_accuracy": balanced, "f1_macro": f1_macro}


def _case_index(groups: Sequence[Any] | np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted case ids and each slide's case number."""
    g = np.asarray([str(c) for c in groups])
    if g.shape != (n,):
        raise ValueError(f"groups must hold one case id per slide ({n}), got {g.shape[0]}")
    cases, inverse = np.unique(g, return_inverse=True)
    return cases, inverse.reshape(-1)


def _none_if_nan(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def bootstrap_metrics(
    labels: np.ndarray,
    probabilities: np.ndarray,
    n_bootstrap: int = 1000,
    ci_level: float = 0.95,
    seed: int = 0,
    groups: Sequence[Any] | np.ndarray | None = None,
) -> dict[str, Any]:
    """Slide-level point estimates and percentile-bootstrap intervals.

    Args:
        groups: the case id of each slide: resample cases, taking all slides of each drawn case (see the
            module docstring). ``None``: resample slides.

    Returns:
        ``{metric: {"value", "ci_low", "ci_high", "n_valid"}}`` for each of :data:`METRIC_NAMES`, plus
        ``n_slides``, ``class_counts`` (per class index), ``n_bootstrap``, ``ci_level``, ``unit``
        (``"slide"``: what the metrics are computed over), ``resampled`` (``"case"`` or ``"slide"``) and,
        with ``groups``, ``n_cases``. Undefined values are ``None``.
    """
    y, p = _validate(labels, probabilities)
    n = y.size
    inverse: np.ndarray | None = None
    n_cases: int | None = None
    if groups is not None:
        cases, inverse = _case_index(groups, n)
        n_cases = len(cases)
    clustered = inverse is not None and n_cases is not None and n_cases < n  # some case has several slides
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows of nanmean
        point = point_metrics(y, p)
        samples: dict[str, list[np.ndarray]] = {name: [] for name in METRIC_NAMES}
        if n > 0 and n_bootstrap > 0:
            rng = np.random.default_rng(seed)
            chunk = max(1, _MAX_CELLS // n)
            for start in range(0, n_bootstrap, chunk):
                rows = min(chunk, n_bootstrap - start)
                if clustered:
                    assert inverse is not None and n_cases is not None
                    drawn = rng.integers(0, n_cases, size=(rows, n_cases))
                    offsets = (drawn + n_cases * np.arange(rows)[:, None]).ravel()
                    times = np.bincount(offsets, minlength=rows * n_cases).reshape(rows, n_cases)
                    values = _resampled_weighted(y, p, times[:, inverse].astype(np.float64))
                else:
                    values = _resampled(y, p, rng.integers(0, n, size=(rows, n)))
                for name, v in values.items():
                    samples[name].append(v)
    out = _summarise(point, samples, ci_level)
    out["n_slides"] = int(n)
    out["class_counts"] = [int((y == c).sum()) for c in range(p.shape[1])]
    out["n_bootstrap"] = int(n_bootstrap)
    out["ci_level"] = float(ci_level)
    out["unit"] = "slide"
    out["resampled"] = "case" if clustered else "slide"
    if n_cases is not None:
        out["n_cases"] = int(n_cases)
    return out


def _summarise(point: dict[str, float], samples: dict[str, list[np.ndarray]], ci_level: float) -> dict[str, Any]:
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
    return out


@dataclass(frozen=True)
class CaseAggregate:
    """Slides aggregated to cases (sorted by case id)."""

    case_ids: list[str]
    labels: np.ndarray  # [C] class index
    probabilities: np.ndarray  # [C, K] mean of the case's slide probabilities
    n_slides: np.ndarray  # [C] slides per case


def aggregate_cases(
    labels: np.ndarray,
    probabilities: np.ndarray,
    groups: Sequence[Any] | np.ndarray,
    classes: Sequence[str] | None = None,
) -> CaseAggregate:
    """One row per case: the mean of its slides' probability vectors and its slides' label.

    Raises:
        MixedCaseLabelError: slides of one case carry different labels (the cases are named, with their
            labels; ``classes`` names the class indices in the message).
    """
    y, p = _validate(labels, probabilities)
    cases, inverse = _case_index(groups, y.size)
    c = len(cases)
    n_slides = np.bincount(inverse, minlength=c)
    sums = np.zeros((c, p.shape[1]))
    np.add.at(sums, inverse, p)
    low = np.full(c, np.iinfo(np.int64).max)
    high = np.full(c, -1)
    np.minimum.at(low, inverse, y)
    np.maximum.at(high, inverse, y)
    mixed = np.flatnonzero(low != high)
    if mixed.size:
        name = (lambda i: classes[i]) if classes is not None else str
        described = [
            f"{str(cases[i])!r} ({', '.join(name(int(k)) for k in np.unique(y[inverse == i]))})" for i in mixed[:10]
        ]
        more = f" and {mixed.size - 10} more" if mixed.size > 10 else ""
        raise MixedCaseLabelError(
            f"{mixed.size} case(s) hold slides of different labels: {', '.join(described)}{more}; a case-level "
            "label is undefined. Give every slide of a case its case's label, or fix the case column."
        )
    return CaseAggregate(
        case_ids=[str(x) for x in cases],
        labels=low.astype(np.int64),
        probabilities=sums / n_slides[:, None],
        n_slides=n_slides,
    )


def case_metrics(
    labels: np.ndarray,
    probabilities: np.ndarray,
    groups: Sequence[Any] | np.ndarray,
    n_bootstrap: int = 1000,
    ci_level: float = 0.95,
    seed: int = 0,
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Case-level metrics: :func:`bootstrap_metrics` over :func:`aggregate_cases` (each case one unit).

    Returns the keys of :func:`bootstrap_metrics` with ``unit`` and ``resampled`` ``"case"``,
    ``class_counts`` counting cases, ``n_cases``, ``n_slides`` (slides aggregated) and
    ``case_probability``. Raises :class:`~wsi_mil.errors.MixedCaseLabelError` like :func:`aggregate_cases`.
    """
    agg = aggregate_cases(labels, probabilities, groups, classes)
    out = bootstrap_metrics(agg.labels, agg.probabilities, n_bootstrap, ci_level, seed)
    out.update(
        unit="case",
        resampled="case",
        n_cases=len(agg.case_ids),
        n_slides=int(agg.n_slides.sum()),
        case_probability=CASE_PROBABILITY,
    )
    return out


def slide_and_case_metrics(
    labels: np.ndarray, probabilities: np.ndarray, groups: Sequence[Any] | np.ndarray, n_bootstrap: int = 1000,
    ci_level: float = 0.95, seed: int = 0, classes: Sequence[str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None, str | None]:
    """Slide-level metrics (bootstrap resampling cases) and case-level metrics of one set of predictions.

    Returns:
        ``(slide_level, case_level, undefined)``: ``case_level`` is ``None`` when a case holds slides of
        different labels, and ``undefined`` then says why (the message of the
        :class:`~wsi_mil.errors.MixedCaseLabelError`); otherwise ``undefined`` is ``None``.
    """
    slides = bootstrap_metrics(labels, probabilities, n_bootstrap, ci_level, seed, groups=groups)
    try:
        return slides, case_metrics(labels, probabilities, groups, n_bootstrap, ci_level, seed, classes), None
    except MixedCaseLabelError as exc:
        return slides, None, str(exc)


def describe_statistics(bootstrap_unit: str, n_bootstrap: int, ci_level: float) -> dict[str, Any]:
    """A plain statement of how the slide- and case-level metrics and their intervals were computed."""
    drawn = (
        "cases, with replacement, taking all slides of each drawn case (slides of one case are correlated)"
        if bootstrap_unit == "case"
        else "slides, with replacement (no case holds several slides, so this is also the case bootstrap)"
    )
    return {
        "slide_level": "metrics over slides (each slide's own probabilities)",
        "case_level": "metrics over cases; a case's label is its slides' label",
        "case_probability": CASE_PROBABILITY,
        "bootstrap_unit": bootstrap_unit,
        "bootstrap": (
            f"{ci_level * 100:g}% percentile intervals of {n_bootstrap} bootstrap resamples; slide-level metrics "
            f"resample {drawn}; case-level metrics resample cases. Each result's 'resampled' names the "
            "unit drawn for it."
        ),
    }


def _cell(metric: dict[str, Any] | None) -> str:
    value = None if metric is None else metric.get("value")
    if metric is None or value is None:
        return "n/a"
    low, high = metric.get("ci_low"), metric.get("ci_high")
    if low is None or high is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _n(m: dict[str, Any] | None) -> str:
    if m is None:
        return ""
    return str(m.get("n_cases", "") if m.get("unit") == "case" else m.get("n_slides", ""))


def format_metrics_table(rows: Sequence[tuple[str, dict[str, Any] | None]]) -> str:
    """A plain-text table: one row per ``(name, bootstrap_metrics(...) or case_metrics(...))``, value [CI]
    per metric, n (slides, or cases for case-level rows); ``None`` prints n/a. Notes under the table say
    what the intervals resample and how case rows are made, when a row resamples or counts cases."""
    header = ["", "n", *METRIC_NAMES]
    body = [[name, _n(m), *(_cell(None if m is None else m[k]) for k in METRIC_NAMES)] for name, m in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *body]]
    notes = []
    present = [m for _, m in rows if m is not None]
    by_case = [m.get("resampled") == "case" or m.get("n_cases") == m.get("n_slides") for m in present]
    if present and all(by_case):  # a slide bootstrap where every case holds one slide resamples cases too
        notes.append("intervals resample cases (each draw takes all slides of a drawn case)")
    if any(m.get("unit") == "case" for m in present):
        notes.append(f"case rows: a case's probability is the {CASE_PROBABILITY}; n counts cases")
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:], *notes])

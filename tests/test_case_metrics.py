"""Case-level statistics: the bootstrap resamples cases (all slides of a drawn case), case-level metrics
average a case's slide probabilities, mixed-label cases are named; train and predict report both levels."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
import torch
import yaml
from _train_data import planted_cohort
from click.testing import CliRunner
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from wsi_mil.cli.train import predict, train
from wsi_mil.cohort.metrics import (
    CASE_PROBABILITY,
    METRIC_NAMES,
    _resampled_weighted,
    aggregate_cases,
    bootstrap_metrics,
    case_metrics,
    format_metrics_table,
    slide_and_case_metrics,
)
from wsi_mil.errors import MixedCaseLabelError


def _sklearn(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    k = p.shape[1]
    pred = p.argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        balanced = balanced_accuracy_score(y, pred)
    auc = float("nan")
    if len(np.unique(y)) == k:
        auc = roc_auc_score(y, p[:, 1]) if k == 2 else roc_auc_score(y, p, multi_class="ovr", labels=list(range(k)))
    return {
        "auc": auc,
        "accuracy": accuracy_score(y, pred),
        "balanced_accuracy": balanced,
        "f1_macro": f1_score(y, pred, average="macro", zero_division=0),
    }


def _row(output: str, name: str) -> list[str]:
    line = next(line for line in output.splitlines() if line.startswith(name))
    return line[len(name) :].split()


def _one_big_case(seed: int = 0):
    """30 one-slide cases, and one case of five tumour slides that are all scored alike (low)."""
    rng = np.random.default_rng(seed)
    y = np.array([0, 1] * 15)
    score = np.clip(0.5 + (y - 0.5) * 0.5 + rng.normal(0, 0.2, 30), 0.01, 0.99)
    big = 0.3 + rng.normal(0, 0.02, 5)
    y = np.r_[y, [1] * 5]
    s = np.r_[score, big]
    groups = [f"P{i:02d}" for i in range(30)] + ["P99"] * 5
    return y, np.stack([1 - s, s], 1), groups


def _clustered(n_cases: int, k: int, seed: int):
    """Cases of 1-4 slides; a case's slides share its label and a case effect on the logits."""
    rng = np.random.default_rng(seed)
    ys, logits, groups = [], [], []
    for c in range(n_cases):
        label = int(rng.integers(0, k))
        effect = rng.normal(size=k)
        effect[label] += 1.0
        for _ in range(int(rng.integers(1, 5))):
            ys.append(label)
            logits.append(effect + rng.normal(0, 0.5, k))
            groups.append(f"case{c:02d}")
    z = np.asarray(logits)
    return np.asarray(ys), np.exp(z) / np.exp(z).sum(1, keepdims=True), groups


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_case_bootstrap_is_wider_than_the_slide_bootstrap_when_one_case_has_five_slides(seed):
    y, p, groups = _one_big_case(seed)
    slides = bootstrap_metrics(y, p, n_bootstrap=2000, seed=seed)
    cases = bootstrap_metrics(y, p, n_bootstrap=2000, seed=seed, groups=groups)
    assert slides["resampled"] == "slide" and cases["resampled"] == "case"
    assert cases["n_cases"] == 31 and cases["n_slides"] == slides["n_slides"] == 35
    for name in ("auc", "accuracy"):
        assert cases[name]["value"] == slides[name]["value"]  # the point estimate is over slides either way
        width_slides = slides[name]["ci_high"] - slides[name]["ci_low"]
        width_cases = cases[name]["ci_high"] - cases[name]["ci_low"]
        assert width_cases > 1.15 * width_slides, (name, width_slides, width_cases)


def test_one_slide_per_case_is_the_slide_bootstrap():
    y, p, _ = _one_big_case()
    plain = bootstrap_metrics(y, p, n_bootstrap=300, seed=4)
    singletons = bootstrap_metrics(y, p, n_bootstrap=300, seed=4, groups=[f"c{i}" for i in range(len(y))])
    assert singletons["resampled"] == "slide" and singletons["n_cases"] == len(y)
    assert {k: singletons[k] for k in METRIC_NAMES} == {k: plain[k] for k in METRIC_NAMES}


@pytest.mark.parametrize("k", [2, 3])
def test_case_bootstrap_equals_a_hand_computed_resampling(k):
    y, p, groups = _clustered(25, k, seed=k)
    n_boot, seed = 300, 7
    got = bootstrap_metrics(y, p, n_bootstrap=n_boot, ci_level=0.9, seed=seed, groups=groups)

    cases = sorted(set(groups))
    slides_of = {c: [i for i, g in enumerate(groups) if g == c] for c in cases}
    drawn = np.random.default_rng(seed).integers(0, len(cases), size=(n_boot, len(cases)))
    values: dict[str, list[float]] = {name: [] for name in METRIC_NAMES}
    for row in drawn:
        idx = np.concatenate([slides_of[cases[c]] for c in row])
        for name, v in _sklearn(y[idx], p[idx]).items():
            values[name].append(v)
    assert got["resampled"] == "case" and got["n_cases"] == 25
    for name in METRIC_NAMES:
        v = np.asarray(values[name])
        v = v[np.isfinite(v)]
        low, high = np.quantile(v, [0.05, 0.95])
        assert got[name]["n_valid"] == v.size
        assert got[name]["ci_low"] == pytest.approx(low, abs=1e-12)
        assert got[name]["ci_high"] == pytest.approx(high, abs=1e-12)
        assert got[name]["value"] == pytest.approx(_sklearn(y, p)[name])


@pytest.mark.parametrize("k", [2, 3])
def test_weighted_resamples_equal_sklearn_on_the_repeated_slides(k):
    y, p, _ = _clustered(12, k, seed=10 + k)
    p = np.round(p, 1)  # ties between scores
    p /= p.sum(1, keepdims=True)
    times = np.random.default_rng(3).integers(0, 3, size=(40, len(y)))
    got = _resampled_weighted(y, p, times.astype(np.float64))
    for b, row in enumerate(times):
        idx = np.repeat(np.arange(len(y)), row)
        expected = _sklearn(y[idx], p[idx])
        for name in METRIC_NAMES:
            if np.isnan(expected[name]):
                assert np.isnan(got[name][b])
            else:
                assert got[name][b] == pytest.approx(expected[name])


def test_case_metrics_equal_sklearn_on_hand_averaged_case_probabilities():
    y, p, groups = _clustered(30, 2, seed=5)
    ids = sorted(set(groups))
    case_p = np.stack([p[[g == c for g in groups]].mean(0) for c in ids])
    case_y = np.asarray([y[groups.index(c)] for c in ids])

    agg = aggregate_cases(y, p, groups)
    assert agg.case_ids == ids and agg.labels.tolist() == case_y.tolist()
    assert np.allclose(agg.probabilities, case_p) and agg.n_slides.tolist() == [groups.count(c) for c in ids]

    m = case_metrics(y, p, groups, n_bootstrap=200, seed=2)
    for name, value in _sklearn(case_y, case_p).items():
        assert m[name]["value"] == pytest.approx(value)
    assert m["auc"]["value"] != pytest.approx(roc_auc_score(y, p[:, 1]))  # not the slide-level AUC
    assert m["unit"] == "case" and m["resampled"] == "case" and m["case_probability"] == CASE_PROBABILITY
    assert m["n_cases"] == 30 and m["n_slides"] == len(y) and m["class_counts"] == np.bincount(case_y).tolist()
    # the intervals resample cases: the bootstrap over the averaged cases with the same seed
    over_cases = bootstrap_metrics(case_y, case_p, n_bootstrap=200, seed=2)
    for name in METRIC_NAMES:
        assert m[name]["ci_low"] == pytest.approx(over_cases[name]["ci_low"])
        assert m[name]["ci_high"] == pytest.approx(over_cases[name]["ci_high"])


def test_mixed_labels_within_a_case_are_named_and_leave_case_metrics_undefined():
    y, p, groups = _clustered(10, 2, seed=8)
    y = y.copy()
    first = groups.index(next(c for c in groups if groups.count(c) > 1))  # a case with several slides
    y[first] = 1 - y[first]
    bad = groups[first]
    with pytest.raises(MixedCaseLabelError, match=rf"1 case\(s\).*'{bad}' \(normal, tumor\)"):
        aggregate_cases(y, p, groups, classes=["normal", "tumor"])
    with pytest.raises(MixedCaseLabelError, match=bad):
        case_metrics(y, p, groups, n_bootstrap=10)
    slides, cases, undefined = slide_and_case_metrics(y, p, groups, n_bootstrap=50, classes=["normal", "tumor"])
    assert cases is None and undefined is not None and repr(bad) in undefined and "different labels" in undefined
    assert slides["resampled"] == "case" and slides == bootstrap_metrics(y, p, n_bootstrap=50, groups=groups)


def test_groups_must_match_the_slides():
    y, p, groups = _clustered(5, 2, seed=0)
    with pytest.raises(ValueError, match="one case id per slide"):
        bootstrap_metrics(y, p, n_bootstrap=10, groups=groups[:-1])


def test_table_counts_cases_in_case_rows_and_says_what_was_resampled():
    y, p, groups = _one_big_case()
    slides, cases, _ = slide_and_case_metrics(y, p, groups, n_bootstrap=100)
    table = format_metrics_table([("all (slides)", slides), ("all (cases)", cases), ("none", None)])
    assert _row(table, "all (slides)")[0] == "35" and _row(table, "all (cases)")[0] == "31"
    assert _row(table, "none") == ["n/a"] * 4
    assert "intervals resample cases" in table and "mean of the case's slide probabilities; n counts cases" in table
    plain = format_metrics_table([("all", bootstrap_metrics(y, p, n_bootstrap=100))])  # slides resampled, no cases known
    assert "resample cases" not in plain and "case rows" not in plain


@pytest.fixture
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.usefixtures("_one_torch_thread")
def test_train_and_predict_report_slide_and_case_level_metrics(tmp_path):
    cohort = planted_cohort(tmp_path / "c", n_slides=12, dim=8, shift=4.0)  # (s000, s002), (s004, s006) share cases
    assert len(set(cohort.cases)) == 10
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"model": {"hidden_dims": [8]}, "metrics": {"n_bootstrap": 200}}))
    run = tmp_path / "run"
    fast = ["--epochs", "6", "--lr", "0.005", "--device", "cpu", "--folds", "3", "--config", str(config)]
    result = CliRunner().invoke(train, [str(cohort.features_dir), "--labels", str(cohort.labels_csv), "--out", str(run), *fast])
    assert result.exit_code == 0, result.output
    assert _row(result.output, "pooled OOF (slides)")[0] == "12" and _row(result.output, "pooled OOF (cases)")[0] == "10"
    assert "intervals resample cases" in result.output and CASE_PROBABILITY in result.output

    metrics = json.loads((run / "metrics.json").read_text())
    slides, cases = metrics["pooled_out_of_fold"], metrics["pooled_out_of_fold_cases"]
    assert slides["resampled"] == "case" and slides["n_slides"] == 12 and slides["n_cases"] == 10
    assert cases["unit"] == "case" and cases["n_cases"] == 10 and cases["n_slides"] == 12 and sum(cases["class_counts"]) == 10
    assert metrics["case_level_undefined"] is None
    assert metrics["statistics"]["bootstrap_unit"] == "case" and metrics["statistics"]["case_probability"] == CASE_PROBABILITY
    assert all(f["test_cases"]["unit"] == "case" for f in metrics["folds"])
    assert sum(f["test_cases"]["n_cases"] for f in metrics["folds"]) == 10

    # the case-level numbers are those of the out-of-fold predictions averaged per case
    with open(run / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    probs = np.asarray([[float(r["prob_normal"]), float(r["prob_tumor"])] for r in rows])
    labels = np.asarray([["normal", "tumor"].index(r["label"]) for r in rows])
    ids = sorted({r["case_id"] for r in rows})
    case_p = np.stack([probs[[r["case_id"] == c for r in rows]].mean(0) for c in ids])
    case_y = np.asarray([labels[[r["case_id"] for r in rows].index(c)] for c in ids])
    for name, value in _sklearn(case_y, case_p).items():
        assert cases[name]["value"] == pytest.approx(value, abs=1e-4)

    # predict --labels: both levels; a table whose case holds a normal and a tumour slide: undefined, named
    out = tmp_path / "pred"
    result = CliRunner().invoke(predict, [str(cohort.features_dir), "--checkpoint", str(run), "--out", str(out), "--labels", str(cohort.labels_csv), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert _row(result.output, "out of fold (slides)")[0] == "12" and _row(result.output, "out of fold (cases)")[0] == "10"
    predicted = json.loads((out / "metrics.json").read_text())
    assert predicted["labelled"]["resampled"] == "case" and predicted["labelled_cases"]["n_cases"] == 10
    assert predicted["statistics"]["bootstrap_unit"] == "case"

    mixed = tmp_path / "mixed.csv"
    mixed.write_text("slide_id,label,case_id\n" + "".join(f"{s},{lab},{'P000' if s == 's001' else c}\n" for s, lab, c in zip(cohort.slide_ids, cohort.labels, cohort.cases, strict=True)))
    result = CliRunner().invoke(predict, [str(cohort.features_dir), "--checkpoint", str(run), "--out", str(tmp_path / "p2"), "--labels", str(mixed), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "case-level metrics undefined" in result.output and "'P000' (normal, tumor)" in result.output
    predicted = json.loads((tmp_path / "p2" / "metrics.json").read_text())
    assert predicted["labelled_cases"] is None and "'P000'" in predicted["case_level_undefined"]
    assert predicted["labelled"]["n_slides"] == 12 and predicted["labelled"]["n_cases"] == 9

"""Splits: case-grouped and label-stratified, validation inside training parts, leakage refused (R20)."""

from __future__ import annotations

import csv
import re
from collections import Counter

import pytest

from wsi_mil.cohort.splits import FoldSplit, check_leakage, make_splits, read_splits, write_splits
from wsi_mil.errors import InputError, SplitLeakageError


def _cohort(n_cases: int = 30):
    """Cases with 1-3 slides each, labels per case, 2:1 class imbalance."""
    ids, cases, labels = [], [], []
    for c in range(n_cases):
        for j in range(1 + c % 3):
            ids.append(f"c{c:02d}_{j}")
            cases.append(f"c{c:02d}")
            labels.append(1 if c % 3 == 0 else 0)
    return ids, cases, labels


def test_folds_partition_slides_keep_cases_together_and_stratify():
    ids, cases, labels = _cohort()
    case_of = dict(zip(ids, cases, strict=True))
    label_of = dict(zip(ids, labels, strict=True))
    folds = make_splits(ids, cases, labels, n_folds=5, val_fraction=0.2, seed=0)
    assert len(folds) == 5
    tested = [s for f in folds for s in f.test]
    assert sorted(tested) == sorted(ids)  # every slide tested exactly once
    for f in folds:
        assert set(f.train) | set(f.val) | set(f.test) == set(ids)
        assert not (set(f.train) & set(f.val)) and not (set(f.train) & set(f.test)) and not (set(f.val) & set(f.test))
        check_leakage([f], case_of)  # no case in two parts
        assert f.val, "each training part gives a validation part"
        positives = Counter(label_of[s] for s in f.test)
        assert positives[1] >= 1 and positives[0] >= 1  # stratified: both classes in every test fold
    # deterministic for a seed, different for another
    again = make_splits(ids, cases, labels, n_folds=5, val_fraction=0.2, seed=0)
    assert [f.test for f in again] == [f.test for f in folds]
    assert [f.test for f in make_splits(ids, cases, labels, n_folds=5, seed=1)] != [f.test for f in folds]


def test_too_few_cases_for_the_folds():
    with pytest.raises(InputError, match="only 4 cases for 5 folds"):
        make_splits(["a", "b", "c", "d"], ["a", "b", "c", "d"], [0, 1, 0, 1], n_folds=5)
    # a class of a single case: no number of folds helps, so the message says that, not "use --folds 2"
    with pytest.raises(InputError, match="class index 1 has a single case"):
        make_splits(["a", "b", "c"], ["a", "b", "c"], [0, 1, 0], n_folds=5)


def test_leakage_names_case_and_fold():
    folds = [FoldSplit(0, ["a", "b"], ["c"], ["d"]), FoldSplit(1, ["a", "d"], [], ["b", "c"])]
    case_of = {"a": "P1", "b": "P2", "c": "P3", "d": "P1"}
    with pytest.raises(SplitLeakageError) as info:
        check_leakage(folds, case_of)
    message = str(info.value)
    assert "case 'P1'" in message and "fold 0" in message and "train (a)" in message and "test (d)" in message


def _write_rows(path, rows, header=("slide_id", "case_id", "label", "fold", "split")):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_read_splits_round_trip_and_validation(tmp_path):
    ids, cases, labels = _cohort(12)
    case_of = dict(zip(ids, cases, strict=True))
    label_of = {s: str(v) for s, v in zip(ids, labels, strict=True)}
    folds = make_splits(ids, cases, labels, n_folds=3, seed=0)
    path = write_splits(tmp_path / "splits.csv", folds, case_of, label_of)
    assert read_splits(path, ids, case_of) == folds

    leaky = _write_rows(tmp_path / "leaky.csv", [["c00_0", "c00", 1, 0, "train"], ["c01_0", "c01", 0, 0, "train"], ["c01_1", "c01", 0, 0, "test"]])
    with pytest.raises(SplitLeakageError, match=r"case 'c01' is in train \(c01_0\) and test \(c01_1\) of fold 0"):
        read_splits(leaky, ids, case_of)

    unknown = _write_rows(tmp_path / "unknown.csv", [["c00_0", "c00", 1, 0, "train"], ["ghost", "x", 1, 0, "test"]])
    with pytest.raises(InputError, match=r"1 slide\(s\) not in the label table: \['ghost'\]"):
        read_splits(unknown, ids, case_of)

    bad = _write_rows(tmp_path / "bad.csv", [["c00_0", "c00", 1, "zero", "train"], ["c01_0", "c01", 0, 0, "holdout"]])
    with pytest.raises(InputError) as info:
        read_splits(bad, ids, case_of)
    assert "line 2: 'zero'" in str(info.value) and "line 3: 'holdout'" in str(info.value)

    missing = _write_rows(tmp_path / "missing.csv", [["c00_0", 0]], header=("slide_id", "fold"))
    with pytest.raises(InputError, match=r"lacks column\(s\) \['split'\]"):
        read_splits(missing, ids, case_of)


def test_the_splits_file_case_column_is_checked_too(tmp_path):
    # the label table knows no cases (each slide its own), the splits file says a and b are one patient
    path = _write_rows(tmp_path / "s.csv", [["a", "P", 0, 0, "train"], ["c", "Q", 1, 0, "train"], ["b", "P", 1, 0, "test"]])
    with pytest.raises(SplitLeakageError, match="case_id column"):
        read_splits(path, ["a", "b", "c"], {"a": "a", "b": "b", "c": "c"})


def test_unusable_slides_are_dropped_and_empty_parts_refused(tmp_path):
    path = _write_rows(tmp_path / "s.csv", [["a", "a", 0, 0, "train"], ["b", "b", 1, 0, "train"], ["c", "c", 1, 0, "test"]])
    folds = read_splits(path, ["a", "b", "c"], {}, usable={"a", "b", "c"})
    assert folds == [FoldSplit(0, ["a", "b"], [], ["c"])]
    with pytest.raises(InputError, match="fold 0 has 2 training and 0 test slides"):
        read_splits(path, ["a", "b", "c"], {}, usable={"a", "b"})


def test_the_folds_advice_works_and_a_cohort_too_small_for_any_fold_says_so():
    ids = [f"s{i}" for i in range(12)]
    cases = [f"c{i // 2}" if i < 4 else f"c{i}" for i in range(12)]  # 10 cases
    labels = [1] * 6 + [0] * 6
    with pytest.raises(InputError, match=r"use --folds (\d+) \(at most\)") as info:
        make_splits(ids, cases, labels, n_folds=9)
    advised = int(re.search(r"--folds (\d+)", str(info.value)).group(1))
    folds = make_splits(ids, cases, labels, n_folds=advised)  # the advice is advice that works
    assert len(folds) == advised and sorted(s for f in folds for s in f.test) == sorted(ids)
    with pytest.raises(InputError, match="can never both train on it and test it"):  # no fold can work
        make_splits(["a", "b"], ["ca", "cb"], [0, 1], n_folds=2)


def test_a_class_with_a_single_case_is_named_with_its_slides():
    ids = [f"s{i}" for i in range(11)]
    labels = [0] * 5 + [1] * 5 + [2]
    with pytest.raises(InputError, match=r"class 'metastasis' has a single case \(slide\(s\) s10\)"):
        make_splits(ids, ids, labels, n_folds=5, class_names=["normal", "tumor", "metastasis"])

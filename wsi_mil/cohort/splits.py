"""Case-grouped, label-stratified k-fold splits with a validation part, and their validation (R20).

``splits.csv`` is in long format, one row per slide and fold::

    slide_id,case_id,label,fold,split
    s01,P01,tumor,0,train
    s02,P02,normal,0,val
    s03,P03,tumor,0,test
    ...

``split`` is ``train`` (fitted on), ``val`` (early stopping and model selection only) or ``test``
(the fold's held-out part: out-of-fold predictions and metrics). Every slide of one case stays in one
part of a fold; each slide is tested in at most one fold.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi_mil.errors import InputError, SplitLeakageError
from wsi_mil.store import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["SPLIT_COLUMNS", "SPLIT_NAMES", "FoldSplit", "check_leakage", "make_splits", "read_splits", "write_splits"]

SPLIT_COLUMNS = ("slide_id", "case_id", "label", "fold", "split")
SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class FoldSplit:
    """Slide ids of one fold's parts (in a stable order)."""

    fold: int
    train: list[str]
    val: list[str]
    test: list[str]

    def parts(self) -> dict[str, list[str]]:
        return {"train": self.train, "val": self.val, "test": self.test}


def _group_kfold(labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedGroupKFold

    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return list(splitter.split(np.zeros(len(labels)), labels, groups))


def make_splits(
    slide_ids: Sequence[str],
    case_ids: Sequence[str],
    labels: Sequence[int],
    n_folds: int = 5,
    val_fraction: float = 0.2,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> list[FoldSplit]:
    """``n_folds`` case-grouped, label-stratified folds; each training part split again (grouped,
    stratified) so that about ``val_fraction`` of its cases validate.

    Raises:
        InputError: fewer cases than folds (the message gives a number of folds that works, or says the
            cohort is too small for any); a class with a single case (named, with its slides: a typo, or a
            class that cross-validation can never both train on and test).
    """
    ids = np.asarray(list(slide_ids), dtype=object)
    cases = np.asarray(list(case_ids), dtype=object)
    y = np.asarray(list(labels), dtype=np.int64)
    if not len(ids) == len(cases) == len(y):
        raise InputError("slide ids, case ids and labels differ in length")

    def name(cls: int) -> str:
        return repr(class_names[cls]) if class_names is not None else f"index {cls}"

    for cls in np.unique(y):  # no number of folds helps a class of one case: say so first
        cls_cases = len(set(cases[y == cls].tolist()))
        if cls_cases == 1:
            slides = sorted(ids[y == cls].tolist())
            raise InputError(
                f"class {name(int(cls))} has a single case (slide(s) {', '.join(slides[:5])}): cross-validation can "
                "never both train on it and test it. If the label is a typo, fix it; to refuse labels outside "
                "the classes you mean, declare them (train --classes a,b or labels.classes in the config)."
            )
    n_cases = len(set(cases.tolist()))
    largest_class = int(np.bincount(y).max()) if len(y) else 0
    workable = min(n_cases, largest_class)  # StratifiedGroupKFold needs both >= folds
    if workable < n_folds:
        have = f"{n_cases} case(s), the largest class {largest_class} slide(s)"
        if workable < 2:
            raise InputError(
                f"the cohort is too small for cross-validation ({have}): any k-fold needs at least 2 cases and "
                "2 slides of one class. Add slides."
            )
        raise InputError(f"only {n_cases} cases for {n_folds} folds ({have}); use --folds {workable} (at most), or add slides.")

    for cls in np.unique(y):
        cls_cases = len(set(cases[y == cls].tolist()))
        if cls_cases < n_folds:
            logger.warning(
                "class %s has only %d cases for %d folds: some test folds will hold none of it "
                "(per-fold AUC undefined there; the pooled out-of-fold metrics still use every slide).",
                name(int(cls)),
                cls_cases,
                n_folds,
            )
    n_inner = max(2, round(1.0 / val_fraction))
    folds = []
    for k, (train_idx, test_idx) in enumerate(_group_kfold(y, cases, n_folds, seed)):
        train_cases = len(set(cases[train_idx].tolist()))
        val_idx = np.empty(0, dtype=np.int64)
        # StratifiedGroupKFold needs at least as many groups, and slides of the largest class, as splits
        inner = min(n_inner, train_cases, int(np.bincount(y[train_idx]).max()))
        if inner >= 2:
            inner_train, inner_val = _group_kfold(y[train_idx], cases[train_idx], inner, seed + 1 + k)[0]
            val_idx = train_idx[inner_val]
            train_idx = train_idx[inner_train]
        else:
            logger.warning("fold %d: too few training cases for a validation part; no early stopping there", k)
        folds.append(
            FoldSplit(
                fold=k,
                train=sorted(ids[train_idx].tolist()),
                val=sorted(ids[val_idx].tolist()),
                test=sorted(ids[test_idx].tolist()),
            )
        )
    return folds


def check_leakage(folds: Sequence[FoldSplit], case_of: Mapping[str, str], source: str = "splits") -> None:
    """Refuse a case with slides in more than one part of a fold, and a slide tested in two folds (R20).

    Raises:
        SplitLeakageError: naming the case (or slide), the fold and the parts.
    """
    problems: list[str] = []
    for fold in folds:
        where: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        for part, slides in fold.parts().items():
            for slide in slides:
                where[case_of.get(slide, slide)][part].append(slide)
        for case, parts in where.items():
            if len(parts) > 1:
                detail = " and ".join(f"{part} ({', '.join(slides[:3])})" for part, slides in parts.items())
                problems.append(f"case {case!r} is in {detail} of fold {fold.fold}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise SplitLeakageError(
            f"{source}: leakage between parts of a fold: {shown}. All slides of one case (patient) must be in "
            "the same part of each fold; fix the splits file or let wsi-mil make the splits (omit --splits)."
        )
    tested: dict[str, list[int]] = defaultdict(list)
    for fold in folds:
        for slide in fold.test:
            tested[slide].append(fold.fold)
    twice = {s: f for s, f in tested.items() if len(f) > 1}
    if twice:
        shown = ", ".join(f"{s!r} (folds {f})" for s, f in list(twice.items())[:5])
        raise SplitLeakageError(
            f"{source}: slides in the test part of more than one fold: {shown}; out-of-fold predictions need "
            "each slide tested at most once."
        )


def write_splits(
    path: str | os.PathLike[str],
    folds: Sequence[FoldSplit],
    case_of: Mapping[str, str],
    label_of: Mapping[str, str],
) -> Path:
    """Write the long-format ``splits.csv`` (atomically)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SPLIT_COLUMNS)
    for fold in folds:
        for part, slides in fold.parts().items():
            for slide in slides:
                writer.writerow([slide, case_of.get(slide, slide), label_of.get(slide, ""), fold.fold, part])
    return atomic_write_text(path, buf.getvalue())


def read_splits(
    path: str | os.PathLike[str],
    known_slides: Sequence[str],
    case_of: Mapping[str, str],
    usable: set[str] | None = None,
) -> list[FoldSplit]:
    """Read and validate a long-format splits file.

    Args:
        path: CSV with at least ``slide_id``, ``fold``, ``split`` (``case_id`` is also checked when present).
        known_slides: slide ids of the label table; others are refused.
        case_of: case id of each slide (from the label table).
        usable: slides that can be trained on (with features, not excluded); others are dropped with a note.

    Raises:
        InputError: missing columns, bad values, unknown slides, a slide twice in one fold, a fold
            without training or test slides.
        SplitLeakageError: see :func:`check_leakage`.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise InputError(f"splits file {p} does not exist.") from exc
    rows = [row for row in csv.reader(text.splitlines()) if any(cell.strip() for cell in row)]
    if not rows:
        raise InputError(f"splits file {p} is empty.")
    header = [cell.strip() for cell in rows[0]]
    col = {name: i for i, name in enumerate(header)}
    missing = [c for c in ("slide_id", "fold", "split") if c not in col]
    if missing:
        raise InputError(
            f"splits file {p} lacks column(s) {missing}; its columns are {header}. Expected the long format "
            f"{','.join(SPLIT_COLUMNS)} (one row per slide and fold)."
        )
    known = set(known_slides)
    parts: dict[int, dict[str, list[str]]] = defaultdict(lambda: {name: [] for name in SPLIT_NAMES})
    file_cases: dict[str, str] = {}
    bad_split, bad_fold, unknown = [], [], []
    seen: dict[tuple[int, str], int] = {}
    duplicates = []
    for line_no, row in enumerate(rows[1:], start=2):
        row = row + [""] * (len(header) - len(row))
        slide = row[col["slide_id"]].strip()
        split = row[col["split"]].strip().lower()
        fold_text = row[col["fold"]].strip()
        if split not in SPLIT_NAMES:
            bad_split.append(f"line {line_no}: {split!r}")
            continue
        try:
            fold = int(fold_text)
        except ValueError:
            bad_fold.append(f"line {line_no}: {fold_text!r}")
            continue
        if slide not in known:
            unknown.append(slide)
            continue
        if (fold, slide) in seen:
            duplicates.append(f"{slide!r} in fold {fold} (lines {seen[(fold, slide)]} and {line_no})")
            continue
        seen[(fold, slide)] = line_no
        if "case_id" in col and row[col["case_id"]].strip():
            file_cases[slide] = row[col["case_id"]].strip()
        parts[fold][split].append(slide)
    problems = []
    if bad_split:
        problems.append(f"split must be one of {list(SPLIT_NAMES)} ({', '.join(bad_split[:5])})")
    if bad_fold:
        problems.append(f"fold must be an integer ({', '.join(bad_fold[:5])})")
    if unknown:
        distinct = sorted(set(unknown))
        problems.append(
            f"{len(distinct)} slide(s) not in the label table: {distinct[:10]}" + (" ..." if len(distinct) > 10 else "")
        )
    if duplicates:
        problems.append("a slide listed twice in one fold: " + "; ".join(duplicates[:5]))
    if problems:
        raise InputError(f"splits file {p}: " + "; ".join(problems) + ".")
    folds = [FoldSplit(k, v["train"], v["val"], v["test"]) for k, v in sorted(parts.items())]
    check_leakage(folds, case_of, source=f"splits file {p}")
    if file_cases:
        check_leakage(folds, {s: file_cases.get(s, case_of.get(s, s)) for s in known}, source=f"splits file {p} (its case_id column)")
    if usable is not None:
        dropped = sorted({s for f in folds for ids in f.parts().values() for s in ids if s not in usable})
        if dropped:
            logger.warning(
                "splits file %s: %d slide(s) without usable features are left out: %s",
                p,
                len(dropped),
                dropped[:10],
            )
            folds = [
                FoldSplit(f.fold, *([s for s in ids if s in usable] for ids in (f.train, f.val, f.test)))
                for f in folds
            ]
    for f in folds:
        if not f.train or not f.test:
            raise InputError(
                f"splits file {p}: fold {f.fold} has {len(f.train)} training and {len(f.test)} test slides; "
                "each fold needs both."
            )
    return folds

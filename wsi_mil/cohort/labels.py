"""The label table: slide id, label and (optionally) case id, read as strings (R19).

Ids stay strings (``"007"`` is not ``7``); a UTF-8 BOM and spaces around header names and cells are
tolerated; every problem is reported with the CSV line numbers it concerns (line 1 is the header).
"""

from __future__ import annotations

import csv
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from wsi_mil.errors import LabelTableError

logger = logging.getLogger(__name__)

__all__ = ["LabelTable", "class_order", "read_labels"]

_MAX_LISTED = 10


@dataclass(frozen=True)
class LabelTable:
    """Rows of a label CSV in file order, plus the class map (``classes[i]`` is class index ``i``)."""

    slide_ids: list[str]
    labels: list[str]
    case_ids: list[str]
    classes: list[str]
    has_case_column: bool
    source: str

    def __len__(self) -> int:
        return len(self.slide_ids)

    @property
    def class_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    def label_of(self) -> dict[str, str]:
        return dict(zip(self.slide_ids, self.labels, strict=True))

    def case_of(self) -> dict[str, str]:
        return dict(zip(self.slide_ids, self.case_ids, strict=True))


def _lines(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:_MAX_LISTED])
    more = f" and {len(numbers) - _MAX_LISTED} more" if len(numbers) > _MAX_LISTED else ""
    return f"line{'s' if len(numbers) > 1 else ''} {shown}{more}"


def class_order(labels: list[str]) -> list[str]:
    """Distinct labels sorted: numerically when all are integers (``2`` before ``10``), else as text."""
    distinct = set(labels)
    try:
        return sorted(distinct, key=lambda s: (int(s), s))
    except ValueError:
        return sorted(distinct)


def read_labels(
    path: str | os.PathLike[str],
    id_col: str = "slide_id",
    label_col: str = "label",
    case_col: str = "case_id",
    classes: list[str] | None = None,
    min_classes: int = 2,
) -> LabelTable:
    """Read and validate a label CSV.

    Args:
        path: CSV file with a header row.
        id_col, label_col: required columns; case_col: optional (absent: each slide is its own case).
        classes: allowed labels in class-index order; ``None``: the labels found, sorted.
        min_classes: fewest distinct labels accepted (training needs 2; prediction 1).

    Raises:
        LabelTableError: unreadable file, missing column, empty id or label, duplicate ids, unknown
            class, fewer than two classes; the message names the lines concerned.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise LabelTableError(f"label table {p} does not exist.") from exc
    except UnicodeDecodeError as exc:
        raise LabelTableError(f"label table {p} is not UTF-8 text ({exc}); save it as UTF-8 CSV.") from exc
    rows = list(csv.reader(text.splitlines()))
    while rows and not any(cell.strip() for cell in rows[-1]):
        rows.pop()
    if not rows:
        raise LabelTableError(f"label table {p} is empty; it needs a header row ({id_col},{label_col},{case_col}).")
    header = [cell.strip() for cell in rows[0]]
    index = {name: i for i, name in enumerate(header)}
    missing = [col for col in (id_col, label_col) if col not in index]
    if missing:
        raise LabelTableError(
            f"label table {p} has no column {', '.join(repr(m) for m in missing)}; its columns are "
            f"{header}. Name the columns with --id-col / --label-col (or labels.id_col / labels.label_col)."
        )
    has_case = case_col in index
    if not has_case:
        logger.warning(
            "label table %s has no case column %r: each slide is treated as its own case. If a patient "
            "has several slides, add a case column (--case-col) so they never straddle train and test.",
            p,
            case_col,
        )

    slide_ids: list[str] = []
    labels: list[str] = []
    case_ids: list[str] = []
    line_numbers: list[int] = []
    empty_id: list[int] = []
    empty_label: list[int] = []
    empty_case: list[int] = []
    for line_no, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank line
        if len(row) < len(header):
            row = row + [""] * (len(header) - len(row))
        slide_id = row[index[id_col]].strip()
        label = row[index[label_col]].strip()
        case_id = row[index[case_col]].strip() if has_case else slide_id
        if not slide_id:
            empty_id.append(line_no)
        if not label:
            empty_label.append(line_no)
        if has_case and not case_id:
            empty_case.append(line_no)
        slide_ids.append(slide_id)
        labels.append(label)
        case_ids.append(case_id)
        line_numbers.append(line_no)

    problems: list[str] = []
    if empty_id:
        problems.append(f"empty {id_col!r} on {_lines(empty_id)}")
    if empty_label:
        problems.append(f"empty {label_col!r} on {_lines(empty_label)}")
    if empty_case:
        problems.append(f"empty {case_col!r} on {_lines(empty_case)} (fill it, or drop the column)")
    seen: dict[str, list[int]] = defaultdict(list)
    for slide_id, line_no in zip(slide_ids, line_numbers, strict=True):
        if slide_id:
            seen[slide_id].append(line_no)
    duplicates = {sid: lines for sid, lines in seen.items() if len(lines) > 1}
    if duplicates:
        listed = "; ".join(f"{sid!r} on {_lines(lines)}" for sid, lines in list(duplicates.items())[:_MAX_LISTED])
        more = f" (and {len(duplicates) - _MAX_LISTED} more ids)" if len(duplicates) > _MAX_LISTED else ""
        problems.append(f"duplicate slide ids: {listed}{more}; keep one row per slide")
    if classes is not None:
        allowed = set(classes)
        unknown = [
            (line_no, label)
            for line_no, label in zip(line_numbers, labels, strict=True)
            if label and label not in allowed
        ]
        if unknown:
            shown = ", ".join(f"line {n}: {lab!r}" for n, lab in unknown[:_MAX_LISTED])
            more = f" and {len(unknown) - _MAX_LISTED} more" if len(unknown) > _MAX_LISTED else ""
            problems.append(f"unknown class ({shown}{more}); allowed classes are {classes}")
    if problems:
        raise LabelTableError(f"label table {p}: " + "; ".join(problems) + ".")
    if not slide_ids:
        raise LabelTableError(f"label table {p} has a header but no rows.")
    class_names = list(classes) if classes is not None else class_order(labels)
    if len(set(labels)) < min_classes:
        raise LabelTableError(
            f"label table {p} holds only the classes {sorted(set(labels))}; training needs at least {min_classes}."
        )
    return LabelTable(
        slide_ids=slide_ids,
        labels=labels,
        case_ids=case_ids,
        classes=class_names,
        has_case_column=has_case,
        source=str(p),
    )

"""Label tables (R19): ids are strings, BOM/spaces tolerated, every problem names its lines."""

from __future__ import annotations

import logging

import pytest

from wsi_mil.cohort.labels import read_labels
from wsi_mil.errors import LabelTableError


def _write(tmp_path, text: str, name: str = "labels.csv", bom: bool = False):
    p = tmp_path / name
    p.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return p


def test_ids_stay_strings_and_bom_and_header_spaces_are_tolerated(tmp_path):
    p = _write(tmp_path, " slide_id , label ,case_id \n007, tumor ,P1\n10,normal,P1\n0010,normal,P2\n", bom=True)
    table = read_labels(p)
    assert table.slide_ids == ["007", "10", "0010"]
    assert table.labels == ["tumor", "normal", "normal"]
    assert table.case_ids == ["P1", "P1", "P2"]
    assert table.classes == ["normal", "tumor"]
    assert table.class_index == {"normal": 0, "tumor": 1}


def test_integer_labels_sort_numerically(tmp_path):
    p = _write(tmp_path, "slide_id,label\na,10\nb,2\nc,1\n")
    assert read_labels(p).classes == ["1", "2", "10"]


def test_configured_classes_keep_their_order(tmp_path):
    p = _write(tmp_path, "slide_id,label\na,tumor\nb,normal\n")
    assert read_labels(p, classes=["tumor", "normal"]).classes == ["tumor", "normal"]


def test_duplicate_ids_name_the_lines(tmp_path):
    p = _write(tmp_path, "slide_id,label\n007,a\nx,b\n007,b\n")
    with pytest.raises(LabelTableError, match=r"duplicate slide ids: '007' on lines 2, 4"):
        read_labels(p)


def test_unknown_class_names_line_and_value(tmp_path):
    p = _write(tmp_path, "slide_id,label\na,tumor\nb,normal\nc,tumour\n")
    with pytest.raises(LabelTableError) as info:
        read_labels(p, classes=["normal", "tumor"])
    assert "line 4: 'tumour'" in str(info.value) and "allowed classes" in str(info.value)


def test_missing_column_lists_the_columns_and_the_option(tmp_path):
    p = _write(tmp_path, "slide,diagnosis\na,tumor\n")
    with pytest.raises(LabelTableError) as info:
        read_labels(p)
    message = str(info.value)
    assert "'slide_id'" in message and "'label'" in message and "['slide', 'diagnosis']" in message
    assert "--id-col" in message
    # and the named columns work
    table = read_labels(_write(tmp_path, "slide,diagnosis\na,tumor\nb,normal\n"), id_col="slide", label_col="diagnosis")
    assert table.slide_ids == ["a", "b"]


def test_empty_label_and_empty_id_name_the_lines(tmp_path):
    p = _write(tmp_path, "slide_id,label\na,tumor\nb,\n,normal\nc\n")
    with pytest.raises(LabelTableError) as info:
        read_labels(p)
    assert "empty 'label' on lines 3, 5" in str(info.value)
    assert "empty 'slide_id' on line 4" in str(info.value)


def test_no_case_column_warns_and_uses_slide_ids(tmp_path, caplog):
    p = _write(tmp_path, "slide_id,label\na,x\nb,y\n")
    with caplog.at_level(logging.WARNING):
        table = read_labels(p)
    assert table.case_ids == ["a", "b"] and not table.has_case_column
    assert "no case column" in caplog.text


def test_single_class_and_empty_tables_are_refused(tmp_path):
    with pytest.raises(LabelTableError, match="at least 2"):
        read_labels(_write(tmp_path, "slide_id,label\na,x\nb,x\n"))
    with pytest.raises(LabelTableError, match="empty"):
        read_labels(_write(tmp_path, "", name="empty.csv"))
    with pytest.raises(LabelTableError, match="does not exist"):
        read_labels(tmp_path / "missing.csv")

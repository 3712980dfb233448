"""HDF5 helpers shared by every file format in :mod:`wsi_mil.store`: opening and attribute values.

* :func:`h5_open` turns a refused file lock into an error that says what to do (R27);
  :func:`open_for_reading` turns a file that is not HDF5 into a :class:`BagFileError` with a remedy;
* :func:`encode_attr` / :func:`decode_attr` map Python values to HDF5 attributes and back (mappings and
  sequences as JSON text, paths as text, ``bytes`` and numpy scalars to ``str`` and Python numbers);
* :func:`text_or_none`, :func:`positive_float`, :func:`positive_int` read optional attributes whose
  "unknown" is written as ``""``, ``-1`` or NaN.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import BagFileError, OutputError
from wsi_mil.store.atomic import HDF5_LOCK_HINT, is_lock_error


def h5_open(path: Any, mode: str = "r", **kwargs: Any) -> Any:
    """``h5py.File`` (on a path or a file object) with lock failures turned into an error that says
    what to do (R27)."""
    import h5py

    try:
        return h5py.File(path, mode, **kwargs)
    except OSError as exc:
        if is_lock_error(exc):
            raise OutputError(f"{path}: {HDF5_LOCK_HINT} ({exc})") from exc
        raise


def open_for_reading(path: Path, where: str, remedy: str) -> Any:
    """An ``h5py.File`` open for reading; :class:`BagFileError` ``"<where> cannot be read as HDF5 (...).
    <remedy>"`` when it is not one."""
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise BagFileError(f"{where} cannot be read as HDF5 ({exc}). {remedy}") from exc


def written_by(attrs: Mapping[str, Any]) -> str:
    """Which wsi-mil wrote a file (from its ``wsi_mil_version`` attribute), for messages about files
    that do not read as expected."""
    from wsi_mil import __version__

    version = decode_attr(attrs.get("wsi_mil_version", ""))
    if version:
        return f"written by wsi-mil {version}; this is wsi-mil {__version__}"
    return "no wsi-mil version recorded: written by another tool, or by wsi-mil before 0.1.0"


def encode_attr(value: Any, *, none: str = "") -> Any:
    """An HDF5-storable attribute: ``None`` as ``none``, mappings/lists/tuples as JSON, paths as text."""
    if value is None:
        return none
    if isinstance(value, Mapping | list | tuple) and not isinstance(value, str):
        return json.dumps(value, default=str)
    if isinstance(value, Path):
        return str(value)
    return value


def decode_attr(value: Any) -> Any:
    """A stored attribute as a plain Python value (text, number, bool or list)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def text_or_none(value: Any) -> str | None:
    """Non-empty text, or ``None`` for a missing or empty attribute."""
    if value is None:
        return None
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return text or None


def positive_float(value: Any) -> float | None:
    """A finite number > 0, or ``None`` (missing, -1, NaN, not a number)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def positive_int(value: Any) -> int | None:
    """An integer > 0, or ``None`` (missing, -1, not a number)."""
    try:
        out = int(value)
    except (TypeError, ValueError):
        return None
    return out if out > 0 else None

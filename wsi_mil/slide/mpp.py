"""Level-0 microns per pixel: the plausible range, reading it from slide metadata, per-slide overrides.

A slide without a usable resolution is refused with :data:`MPP_REMEDY`, the ways to give it.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping
from pathlib import Path

from wsi_mil.errors import InputError, InvalidMPPError

#: Plausible level-0 microns per pixel (100x oil is ~0.1, 5x scans are ~2; coarser is not a WSI).
MPP_RANGE: tuple[float, float] = (0.05, 10.0)

MPP_REMEDY = (
    "Give the level-0 microns per pixel yourself: `--mpp-override 0.25` for every slide, or "
    "`--mpp-override-csv FILE` with columns slide_id,mpp for some; or rescan/export the slide with "
    "its resolution in the metadata."
)


def check_mpp(mpp: float, where: str) -> float:
    lo, hi = MPP_RANGE
    if not (math.isfinite(mpp) and lo <= mpp <= hi):
        raise InvalidMPPError(
            f"{where}: {mpp} µm/px is outside the plausible range [{lo}, {hi}] µm/px for level 0. "
            + MPP_REMEDY
        )
    return mpp


def _float_or_none(value: object) -> float | None:
    if value in (None, "", "None"):
        return None
    try:
        f = float(str(value))
    except ValueError:
        return None
    return f if math.isfinite(f) and f > 0 else None


def mpp_from_properties(props: Mapping[str, str]) -> tuple[float | None, float | None]:
    for kx, ky in (
        ("openslide.mpp-x", "openslide.mpp-y"),
        ("tiffslide.mpp-x", "tiffslide.mpp-y"),
        ("aperio.MPP", "aperio.MPP"),
    ):
        x = _float_or_none(props.get(kx))
        if x is not None:
            return x, _float_or_none(props.get(ky))
    # TIFF resolution tags: pixels per unit.
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    res_x = _float_or_none(props.get("tiff.XResolution"))
    if res_x is not None and unit in ("centimeter", "3"):
        return 1e4 / res_x, None
    if res_x is not None and unit in ("inch", "2"):
        return 25400.0 / res_x, None
    return None, None


def load_mpp_overrides(csv_path: str | os.PathLike[str]) -> dict[str, float]:
    """Read a ``slide_id,mpp`` CSV of per-slide overrides (ids are strings)."""
    p = Path(csv_path)
    if not p.is_file():
        raise InputError(f"mpp override table {p} does not exist.")
    out: dict[str, float] = {}
    with open(p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        if "slide_id" not in fields or "mpp" not in fields:
            raise InputError(f"mpp override table {p} needs columns slide_id,mpp; it has {fields}.")
        for row_no, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            try:
                mpp = float(row["mpp"])
            except ValueError as exc:
                raise InputError(f"{p}, line {row_no}: mpp {row['mpp']!r} is not a number.") from exc
            out[row["slide_id"]] = check_mpp(mpp, f"{p}, line {row_no}")
    return out


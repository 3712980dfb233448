"""Tile coordinate files (``coords/<id>.h5``, written by ``wsi-mil tiles``) and the grid they hold.

Schema: datasets ``coords`` int64 ``(N, 2)`` (level-0 top-left x, y, row-major) and ``tissue_fraction``
float32 ``(N,)``; attributes ``format_version`` (:data:`COORDS_FORMAT_VERSION`), ``mpp`` (tile µm/px),
``tile_px``, ``footprint_px`` (level-0 tile side, rounded half up) and ``footprint_px_exact``,
``slide_mpp``, ``slide_width``, ``slide_height`` (level 0), ``stride_px``, ``min_tissue_fraction``,
``level`` (pyramid level read), ``n_tiles``, ``slide_id``, any extras of the writer (``None`` stored as
``"None"``, mappings and lists as JSON) and ``complete``, set last.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import BagFileError
from wsi_mil.store.atomic import as_output_error, atomic_path
from wsi_mil.store.hdf5 import decode_attr, encode_attr, written_by

#: Version of the coords HDF5 layout, stored as the ``format_version`` attribute.
COORDS_FORMAT_VERSION = 1


@dataclass(frozen=True, eq=False)
class TileGrid:
    """Tiles kept on one slide."""

    #: Level-0 top-left (x, y) of each tile, int64 ``(N, 2)``, row-major.
    coords: np.ndarray
    #: Tile size in pixels at ``mpp``.
    tile_px: int
    #: Target µm/px of the tiles.
    mpp: float
    #: Level-0 µm/px of the slide.
    slide_mpp: float
    #: Level-0 footprint of a tile, rounded half up.
    footprint_px: int
    #: Level-0 footprint of a tile, exact: ``tile_px * mpp / slide_mpp``.
    footprint_px_exact: float
    #: Step between tiles in target pixels.
    stride_px: int
    #: Level-0 (width, height) of the slide.
    slide_dimensions: tuple[int, int]
    #: Tissue fraction of each tile's footprint, float32 ``(N,)``.
    tissue_fraction: np.ndarray
    #: Pyramid level that ``Slide.read_region_mpp`` reads for ``mpp``.
    level: int
    min_tissue_fraction: float
    slide_id: str = ""

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def n_tiles(self) -> int:
        return len(self)

    @property
    def stride_px_l0_exact(self) -> float:
        """Level-0 pixels between neighbouring tiles."""
        return self.stride_px * self.mpp / self.slide_mpp

    def attrs(self) -> dict[str, Any]:
        """HDF5 attributes describing the grid (plain Python scalars)."""
        return {
            "format_version": COORDS_FORMAT_VERSION,
            "mpp": float(self.mpp),
            "tile_px": int(self.tile_px),
            "footprint_px": int(self.footprint_px),
            "footprint_px_exact": float(self.footprint_px_exact),
            "slide_mpp": float(self.slide_mpp),
            "slide_width": int(self.slide_dimensions[0]),
            "slide_height": int(self.slide_dimensions[1]),
            "stride_px": int(self.stride_px),
            "min_tissue_fraction": float(self.min_tissue_fraction),
            "level": int(self.level),
            "n_tiles": len(self),
        }


@dataclass(frozen=True, eq=False)
class CoordsFile:
    """A coords HDF5 file read back: the grid, the slide id, and every attribute stored."""

    path: Path
    slide_id: str
    grid: TileGrid
    #: All attributes of the file (grid attributes, ``slide_id``, ``complete``, extras).
    attrs: dict[str, Any]

    @property
    def coords(self) -> np.ndarray:
        return self.grid.coords

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete", False))

    def __len__(self) -> int:
        return len(self.grid)


def write_coords_h5(
    path: str | os.PathLike[str],
    grid: TileGrid,
    slide_id: str,
    extra_attrs: dict[str, Any] | None = None,
) -> Path:
    """Write ``coords`` (int64 ``(N, 2)``) and ``tissue_fraction`` with the grid's attributes.

    Written to a temp file in the same folder, ``complete=True`` set last, then moved into place
    with ``os.replace``: the path holds either nothing, the previous file, or a complete file.
    """
    import h5py

    dest = Path(path)
    attrs: dict[str, Any] = {**(extra_attrs or {}), **grid.attrs(), "slide_id": str(slide_id)}
    try:
        with atomic_path(dest) as tmp:
            with h5py.File(tmp, "w") as h5:
                coords = np.ascontiguousarray(grid.coords, dtype=np.int64).reshape(-1, 2)
                h5.create_dataset("coords", data=coords)
                h5.create_dataset("tissue_fraction", data=np.asarray(grid.tissue_fraction, np.float32))
                for key, value in attrs.items():
                    h5.attrs[key] = encode_attr(value, none="None")
                h5.attrs["complete"] = False
                h5.flush()
                h5.attrs["complete"] = True
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
    except OSError as exc:
        raise as_output_error(exc, dest.parent) from exc
    return dest


def read_coords_h5(path: str | os.PathLike[str]) -> CoordsFile:
    """Read a coords file written by :func:`write_coords_h5`.

    Raises :class:`~wsi_mil.errors.BagFileError` for a file that is unreadable, incomplete, or not a
    coords file (so callers recompute it rather than take it as done).
    """
    import h5py

    p = Path(path)
    try:
        with h5py.File(p, "r") as h5:
            attrs = {str(k): decode_attr(v) for k, v in h5.attrs.items()}
            if not attrs.get("complete", False):
                raise BagFileError(f"{p} is incomplete (no complete=True attribute): it will be recomputed.")
            version = attrs.get("format_version", COORDS_FORMAT_VERSION)
            if isinstance(version, int) and version > COORDS_FORMAT_VERSION:
                raise BagFileError(
                    f"{p} is a coords file of format {version}, written by a newer wsi-mil; this version reads "
                    f"format {COORDS_FORMAT_VERSION}. Upgrade wsi-mil, or run `wsi-mil tiles` again."
                )
            if "coords" not in h5:
                raise BagFileError(f"{p} has no 'coords' dataset: not a wsi-mil coords file ({written_by(attrs)}).")
            coords = np.asarray(h5["coords"][...], dtype=np.int64).reshape(-1, 2)
            fraction = (
                np.asarray(h5["tissue_fraction"][...], np.float32)
                if "tissue_fraction" in h5
                else np.full((len(coords),), np.nan, np.float32)
            )
    except BagFileError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise BagFileError(f"{p} is not a readable coords file ({type(exc).__name__}: {exc}).") from exc
    missing = [
        k
        for k in ("mpp", "tile_px", "footprint_px", "slide_mpp", "slide_width", "slide_height")
        if k not in attrs
    ]
    if missing:
        raise BagFileError(f"{p} lacks the attributes {missing}: not a wsi-mil coords file ({written_by(attrs)}).")
    tile_px, mpp, slide_mpp = int(attrs["tile_px"]), float(attrs["mpp"]), float(attrs["slide_mpp"])
    if len(fraction) != len(coords):
        raise BagFileError(f"{p}: {len(coords)} coords but {len(fraction)} tissue fractions.")
    grid = TileGrid(
        coords=coords,
        tile_px=tile_px,
        mpp=mpp,
        slide_mpp=slide_mpp,
        footprint_px=int(attrs["footprint_px"]),
        footprint_px_exact=float(attrs.get("footprint_px_exact", tile_px * mpp / slide_mpp)),
        stride_px=int(attrs.get("stride_px", tile_px)),
        slide_dimensions=(int(attrs["slide_width"]), int(attrs["slide_height"])),
        tissue_fraction=fraction,
        level=int(attrs.get("level", 0)),
        min_tissue_fraction=float(attrs.get("min_tissue_fraction", float("nan"))),
        slide_id=str(attrs.get("slide_id", p.stem)),
    )
    return CoordsFile(path=p, slide_id=grid.slide_id, grid=grid, attrs=attrs)

"""A tile grid at an exact µm/px over the tissue mask (stored by :mod:`wsi_mil.store.coords_file`).

Coordinates are level-0 pixels of each tile's top-left corner, ``int64`` ``(N, 2)`` as ``(x, y)``,
in row-major order (by y, then x). A tile of ``tile_px`` pixels at ``mpp`` µm/px covers
``tile_px * mpp / slide.mpp`` level-0 pixels (the *footprint*) computed from the slide's own mpp,
never from a nominal magnification: 256 px at 0.5 µm/px is 486.5 level-0 px on a 0.2631 µm/px
slide. The exact footprint is kept as a float; the integer ``footprint_px`` rounds half up (487).
Grid positions are ``floor(i * stride_l0 + 0.5)`` with the exact level-0 stride, so rounding never
accumulates along a row.

A tile is kept when the tissue fraction of its footprint, measured exactly on the tissue mask (a
summed-area table sampled bilinearly at the tile corners, one vectorised call), is at least
``min_tissue_fraction``. Only tiles lying wholly inside the slide are laid.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from wsi_mil.errors import ConfigError, InputError
from wsi_mil.slide import Slide
from wsi_mil.store.coords_file import TileGrid
from wsi_mil.tissue import TissueResult

logger = logging.getLogger(__name__)

def round_half_up(value: float) -> int:
    """``floor(value + 0.5)``: 486.5 -> 487 (Python's ``round`` gives 486)."""
    return int(math.floor(value + 0.5))


@dataclass(frozen=True)
class TileParams:
    """Tile grid settings: tile size and stride in pixels at ``mpp`` µm/px."""

    mpp: float = 0.5
    tile_px: int = 256
    #: Step between tiles in target pixels; ``None`` means ``tile_px`` (no overlap).
    stride_px: int | None = None
    min_tissue_fraction: float = 0.5

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.mpp) and self.mpp > 0):
            problems.append(f"mpp must be > 0 µm/px, got {self.mpp}")
        if self.tile_px < 1:
            problems.append(f"tile_px must be >= 1, got {self.tile_px}")
        if self.stride_px is not None and self.stride_px < 1:
            problems.append(f"stride_px must be >= 1, got {self.stride_px}")
        if not 0.0 <= self.min_tissue_fraction <= 1.0:
            problems.append(f"min_tissue_fraction must lie in [0, 1], got {self.min_tissue_fraction}")
        if problems:
            raise ConfigError("Invalid tiling parameters: " + "; ".join(problems) + ".")

    @property
    def effective_stride_px(self) -> int:
        return self.tile_px if self.stride_px is None else self.stride_px


def tile_grid(slide: Slide, tissue: TissueResult, params: TileParams = TileParams()) -> TileGrid:
    """Lay the grid over ``slide`` and keep the tiles with enough tissue in ``tissue.mask``.

    An empty tissue result gives an empty grid (``coords`` of shape ``(0, 2)``); callers that need
    tiles check ``len(grid)`` (and ``tissue.require_tissue()``).
    """
    w0, h0 = slide.dimensions
    if tuple(tissue.slide_dimensions) != (w0, h0):
        raise InputError(
            f"The tissue result is for a {tissue.slide_dimensions[0]}x{tissue.slide_dimensions[1]} px slide "
            f"('{tissue.slide_id}') but '{slide.slide_id}' is {w0}x{h0} px; detect tissue on this slide."
        )
    stride_px = params.effective_stride_px
    scale = params.mpp / slide.mpp  # level-0 px per target px
    footprint_exact = params.tile_px * scale
    footprint_px = max(1, round_half_up(footprint_exact))
    stride_l0 = stride_px * scale
    if scale < 1:
        logger.warning(
            "%s: tiles at %.4g µm/px are finer than the slide (%.4g µm/px); they will be upsampled",
            slide.slide_id,
            params.mpp,
            slide.mpp,
        )
    xs = _positions(w0, footprint_px, stride_l0)
    ys = _positions(h0, footprint_px, stride_l0)
    if xs.size and ys.size and not tissue.is_empty:
        fraction = _tissue_fraction(tissue.mask, tissue.downsample_xy, xs, ys, footprint_exact, (w0, h0))
        keep = fraction >= params.min_tissue_fraction - 1e-9
        yy, xx = np.nonzero(keep)  # row-major: sorted by y index, then x index
        coords = np.stack([xs[xx], ys[yy]], axis=1).astype(np.int64)
        kept_fraction = fraction[yy, xx].astype(np.float32)
    else:
        coords = np.zeros((0, 2), np.int64)
        kept_fraction = np.zeros((0,), np.float32)
    grid = TileGrid(
        coords=np.ascontiguousarray(coords),
        tile_px=params.tile_px,
        mpp=params.mpp,
        slide_mpp=slide.mpp,
        footprint_px=footprint_px,
        footprint_px_exact=footprint_exact,
        stride_px=stride_px,
        slide_dimensions=(w0, h0),
        tissue_fraction=kept_fraction,
        level=slide.best_level_for_mpp(params.mpp),
        min_tissue_fraction=params.min_tissue_fraction,
        slide_id=slide.slide_id,
    )
    logger.info(
        "%s: %d tiles of %d px at %.4g µm/px (level-0 footprint %.2f -> %d px, stride %d px), from %dx%d positions",
        slide.slide_id,
        len(grid),
        params.tile_px,
        params.mpp,
        footprint_exact,
        footprint_px,
        stride_px,
        xs.size,
        ys.size,
    )
    return grid


def _positions(length_px: int, footprint_px: int, stride_l0: float) -> np.ndarray:
    """Level-0 starts ``floor(i * stride + 0.5)`` of tiles lying wholly inside ``[0, length_px)``."""
    if footprint_px > length_px:
        return np.zeros((0,), np.int64)
    n = int(math.floor((length_px - footprint_px) / stride_l0)) + 2
    starts = np.floor(np.arange(n, dtype=np.float64) * stride_l0 + 0.5).astype(np.int64)
    return starts[starts + footprint_px <= length_px]


def _tissue_fraction(
    mask: np.ndarray,
    downsample_xy: tuple[float, float],
    xs: np.ndarray,
    ys: np.ndarray,
    footprint_l0: float,
    slide_dimensions: tuple[int, int],
) -> np.ndarray:
    """Exact tissue fraction of every footprint ``[x, x + f) x [y, y + f)``, shape ``(len(ys), len(xs))``.

    The summed-area table of a piecewise-constant mask is bilinear within each pixel, so sampling it
    bilinearly at fractional corners gives exact box integrals.
    """
    dsx, dsy = downsample_xy
    mh, mw = mask.shape
    sat = cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_32S)  # (mh + 1, mw + 1)
    u0 = np.clip(xs / dsx, 0, mw)
    u1 = np.clip(np.minimum(xs + footprint_l0, slide_dimensions[0]) / dsx, 0, mw)
    v0 = np.clip(ys / dsy, 0, mh)
    v1 = np.clip(np.minimum(ys + footprint_l0, slide_dimensions[1]) / dsy, 0, mh)

    def corner(v: np.ndarray, u: np.ndarray) -> np.ndarray:
        vv, uu = np.meshgrid(v, u, indexing="ij")
        return ndimage.map_coordinates(sat, [vv, uu], order=1, mode="nearest", output=np.float64)

    area = corner(v1, u1) - corner(v0, u1) - corner(v1, u0) + corner(v0, u0)
    box = np.outer(v1 - v0, u1 - u0)
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(box > 0, area / box, 0.0)
    return np.clip(fraction, 0.0, 1.0)


# --- coords HDF5 ------------------------------------------------------------------------------------

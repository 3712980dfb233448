"""Deep-zoom tiling over :class:`~wsi_mil.slide.base.Slide` reads, for zoomable viewers (``wsi-mil view``).

The pyramid is the Deep Zoom (DZI) one that OpenSeadragon reads: level ``L`` of ``0..max_level`` (with
``max_level = ceil(log2(max(width, height)))``) is the slide at downsample ``2 ** (max_level - L)``,
``ceil(width / ds) x ceil(height / ds)`` pixels, cut into ``tile_px`` squares that overlap their
neighbours by ``overlap_px`` on each inner side (so a 254-px tile with overlap 1 is at most 256 px).

A tile is read from the coarsest slide level that is at least as fine as the tile's downsample and
resized with area interpolation, so every slide ``extract`` reads (either backend) has a pyramid, and a
tile read never exceeds ``(tile_px + 2 overlap) x`` the ratio between neighbouring slide levels. Output
pixel ``(j, i)`` of tile ``(col, row)`` at level ``L`` covers level-0 ``[(x0 + j) ds, (x0 + j + 1) ds)``
(``x0`` the tile's left edge in level-``L`` pixels): :meth:`DeepZoomGrid.tile_box` gives that mapping,
which overlays drawn on the same grid use. Areas past the slide's edge read as white.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from wsi_mil.errors import InputError
from wsi_mil.slide.base import Slide

__all__ = ["DEFAULT_OVERLAP_PX", "DEFAULT_TILE_PX", "DeepZoomGrid", "TileBox", "TileRequestError", "read_tile"]

DEFAULT_TILE_PX = 254
DEFAULT_OVERLAP_PX = 1


class TileRequestError(InputError):
    """A deep-zoom level, column or row that is not a number or lies outside the pyramid."""


@dataclass(frozen=True)
class TileBox:
    """Where one deep-zoom tile lies: level-``level`` pixels and the level-0 box they cover."""

    level: int
    #: left/top edge in pixels of its deep-zoom level
    x: int
    y: int
    #: output size in pixels
    width: int
    height: int
    #: level-0 pixels per output pixel (a power of two)
    downsample: int

    @property
    def level0_origin(self) -> tuple[int, int]:
        return self.x * self.downsample, self.y * self.downsample

    @property
    def level0_size(self) -> tuple[int, int]:
        return self.width * self.downsample, self.height * self.downsample


@dataclass(frozen=True)
class DeepZoomGrid:
    """The Deep Zoom pyramid of a level-0 ``width x height`` image (geometry only; see the module docstring)."""

    width: int
    height: int
    tile_px: int = DEFAULT_TILE_PX
    overlap_px: int = DEFAULT_OVERLAP_PX

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise InputError(f"a deep-zoom pyramid needs a non-empty image, got {self.width} x {self.height} px")
        if self.tile_px < 1 or self.overlap_px < 0:
            raise InputError(f"tile side {self.tile_px} and overlap {self.overlap_px} px are not usable")

    @property
    def max_level(self) -> int:
        return max(0, math.ceil(math.log2(max(self.width, self.height))))

    @property
    def level_count(self) -> int:
        return self.max_level + 1

    def downsample(self, level: int) -> int:
        return 1 << (self.max_level - level)

    def level_dimensions(self, level: int) -> tuple[int, int]:
        ds = self.downsample(level)
        return -(-self.width // ds), -(-self.height // ds)

    def tile_count(self, level: int) -> tuple[int, int]:
        """(columns, rows) of tiles at ``level``."""
        w, h = self.level_dimensions(level)
        return -(-w // self.tile_px), -(-h // self.tile_px)

    def check(self, level: object, col: object, row: object) -> tuple[int, int, int]:
        """``(level, col, row)`` as integers inside the pyramid; :class:`TileRequestError` otherwise.

        Accepts ints or strings of decimal digits only (no sign, no spaces, at most 9 digits).
        """
        values = []
        for name, value in (("level", level), ("column", col), ("row", row)):
            if isinstance(value, bool):
                raise TileRequestError(f"the tile {name} must be a whole number, got {value!r}")
            if isinstance(value, int):
                number = value
            elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 9:
                number = int(value)
            else:
                raise TileRequestError(f"the tile {name} must be a whole number, got {str(value)[:40]!r}")
            values.append(number)
        lv, c, r = values
        if not 0 <= lv <= self.max_level:
            raise TileRequestError(f"level {lv} is outside the pyramid (0 to {self.max_level})")
        cols, rows = self.tile_count(lv)
        if not (0 <= c < cols and 0 <= r < rows):
            raise TileRequestError(f"tile ({c}, {r}) is outside level {lv} ({cols} x {rows} tiles)")
        return lv, c, r

    def tile_box(self, level: int, col: int, row: int) -> TileBox:
        """The pixels of tile ``(col, row)`` at ``level`` (checked with :meth:`check`)."""
        level, col, row = self.check(level, col, row)
        w, h = self.level_dimensions(level)
        x0 = col * self.tile_px - (self.overlap_px if col > 0 else 0)
        y0 = row * self.tile_px - (self.overlap_px if row > 0 else 0)
        x1 = min(w, (col + 1) * self.tile_px + self.overlap_px)
        y1 = min(h, (row + 1) * self.tile_px + self.overlap_px)
        return TileBox(level, x0, y0, x1 - x0, y1 - y0, self.downsample(level))

    def dzi_xml(self, image_format: str = "jpeg") -> str:
        """The ``.dzi`` descriptor of this pyramid."""
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{image_format}" '
            f'Overlap="{self.overlap_px}" TileSize="{self.tile_px}"><Size Width="{self.width}" '
            f'Height="{self.height}"/></Image>\n'
        )


def read_tile(slide: Slide, grid: DeepZoomGrid, level: int, col: int, row: int) -> np.ndarray:
    """RGB uint8 ``(h, w, 3)`` of one deep-zoom tile of ``slide`` (``grid`` made from its level-0 size)."""
    box = grid.tile_box(level, col, row)
    ds = box.downsample
    source = slide.best_level_for_downsample(float(ds))
    ratio = ds / slide.level_downsamples[source]  # source-level pixels per output pixel (>= 1)
    read_w, read_h = max(1, math.ceil(box.width * ratio - 1e-9)), max(1, math.ceil(box.height * ratio - 1e-9))
    region = slide.read_region(box.level0_origin, source, (read_w, read_h))
    if (read_w, read_h) == (box.width, box.height):
        return region
    return np.ascontiguousarray(cv2.resize(region, (box.width, box.height), interpolation=cv2.INTER_AREA))

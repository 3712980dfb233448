"""Write pyramidal slides with tifffile that both OpenSlide and tiffslide read with all levels.

Used by the sample cohort, the test fixtures and the benchmarks. Two layouts:

* ``svs``: Aperio-style. Page 0 is the tiled base level whose ``ImageDescription`` starts with
  ``Aperio Image Library`` and carries ``|AppMag = ..|MPP = ..``, then a stripped thumbnail page,
  then each reduced level as a tiled page (all ``subfiletype=0``).
* ``tif``: generic pyramidal TIFF. Every level a tiled page in the main IFD chain (never SubIFDs:
  OpenSlide then sees one level), level 0 ``subfiletype=0`` and the others ``1``, each with its
  resolution tags in pixels per centimetre.

Level 0 may be given as an array or as a function rendering any region at any downsample, so slides
much larger than memory (e.g. 40,000 x 40,000 px) can be written tile by tile.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

#: ``render(downsample, x, y, w, h) -> uint8 (h, w, 3)``: a region of the level at ``downsample``,
#: in that level's pixels.
RegionRenderer = Callable[[float, int, int, int, int], np.ndarray]

SlideFormat = Literal["svs", "tif"]


def _array_renderer(level0: np.ndarray) -> RegionRenderer:
    cache: dict[float, np.ndarray] = {1.0: level0}
    h0, w0 = level0.shape[:2]

    def render(downsample: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        if downsample not in cache:
            size = (max(1, int(w0 // downsample)), max(1, int(h0 // downsample)))
            cache[downsample] = cv2.resize(level0, size, interpolation=cv2.INTER_AREA)
        return cache[downsample][y : y + h, x : x + w]

    return render


def _tiles(render: RegionRenderer, downsample: float, width: int, height: int, tile_px: int) -> Iterator[np.ndarray]:
    for y in range(0, height, tile_px):
        for x in range(0, width, tile_px):
            w, h = min(tile_px, width - x), min(tile_px, height - y)
            region = np.asarray(render(downsample, x, y, w, h), dtype=np.uint8)
            if region.shape[:2] != (tile_px, tile_px):
                padded = np.full((tile_px, tile_px, 3), 255, dtype=np.uint8)
                padded[: region.shape[0], : region.shape[1]] = region[..., :3]
                region = padded
            yield np.ascontiguousarray(region[..., :3])


def write_pyramid(
    path: str | os.PathLike[str],
    level0: np.ndarray | RegionRenderer,
    *,
    mpp: float | None,
    fmt: SlideFormat = "tif",
    size_px: tuple[int, int] | None = None,
    downsamples: Sequence[int] = (1, 4, 16),
    tile_px: int = 256,
    compression: str | None = "jpeg",
    quality: int = 90,
    objective_power: int = 20,
) -> Path:
    """Write a pyramidal slide and return its path.

    ``level0`` is an RGB uint8 array, or a renderer (then ``size_px=(width, height)`` is required).
    ``mpp=None`` writes no resolution metadata (for missing-mpp tests). Levels whose size would drop
    below one tile are omitted.
    """
    import tifffile

    p = Path(path)
    if isinstance(level0, np.ndarray):
        if level0.ndim != 3 or level0.shape[2] != 3 or level0.dtype != np.uint8:
            raise ValueError("level0 must be an RGB uint8 array of shape (h, w, 3)")
        height, width = level0.shape[:2]
        render = _array_renderer(level0)
    else:
        if size_px is None:
            raise ValueError("size_px=(width, height) is required with a renderer")
        width, height = size_px
        render = level0
    levels = [int(d) for d in downsamples if d == 1 or min(width // d, height // d) >= 16]
    if levels[0] != 1:
        levels.insert(0, 1)
    codec: dict[str, Any] = {}
    if compression == "jpeg":
        codec = {"compression": "jpeg", "compressionargs": {"level": quality}}
    elif compression:
        codec = {"compression": compression}
    bigtiff = width * height * 3 > 2**31
    with tifffile.TiffWriter(p, bigtiff=bigtiff) as tw:
        for index, ds in enumerate(levels):
            lw, lh = width // ds, height // ds
            common: dict[str, Any] = {
                "shape": (lh, lw, 3),
                "dtype": np.uint8,
                "tile": (tile_px, tile_px),
                "photometric": "rgb",
                "metadata": None,
                **codec,
            }
            if fmt == "svs":
                if index == 0:
                    desc = f"Aperio Image Library v12.0.15\n{width}x{height} [0,0 {width}x{height}] ({tile_px}x{tile_px})"
                    desc += f" JPEG/RGB Q={quality}|AppMag = {objective_power}"
                    if mpp is not None:
                        desc += f"|MPP = {mpp}"
                    tw.write(_tiles(render, ds, lw, lh, tile_px), description=desc, subfiletype=0, **common)
                    thumb = _thumbnail(render, width, height)
                    tw.write(
                        thumb,
                        photometric="rgb",
                        metadata=None,
                        description=f"Aperio Image Library v12.0.15\n{width}x{height} -> {thumb.shape[1]}x{thumb.shape[0]}",
                        subfiletype=0,
                        **codec,
                    )
                else:
                    desc = f"Aperio Image Library v12.0.15\n{width}x{height} -> {lw}x{lh}"
                    tw.write(_tiles(render, ds, lw, lh, tile_px), description=desc, subfiletype=0, **common)
            elif fmt == "tif":
                extra: dict[str, Any] = {}
                if mpp is not None:
                    res = 1e4 / (mpp * ds)
                    extra = {"resolution": (res, res), "resolutionunit": "CENTIMETER"}
                tw.write(
                    _tiles(render, ds, lw, lh, tile_px), subfiletype=0 if index == 0 else 1, **common, **extra
                )
            else:
                raise ValueError(f"unknown slide format {fmt!r}; use 'svs' or 'tif'")
    return p


def _thumbnail(render: RegionRenderer, width: int, height: int, max_side_px: int = 512) -> np.ndarray:
    ds = max(width, height) / max_side_px
    # Render the thumbnail from a coarse level rendering, resized to the thumbnail size.
    coarse_ds = float(max(1, int(ds)))
    cw, ch = int(width // coarse_ds), int(height // coarse_ds)
    coarse = np.asarray(render(coarse_ds, 0, 0, cw, ch), dtype=np.uint8)
    size = (max(1, round(width / ds)), max(1, round(height / ds)))
    return np.ascontiguousarray(cv2.resize(coarse, size, interpolation=cv2.INTER_AREA))

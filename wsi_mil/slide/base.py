"""The :class:`Slide` interface every backend gives: levels, level-0 µm/px and every read, as RGB ``uint8``
(transparent pixels on white) at level-0 (x, y) top-left locations, each checked against the pixel budget
(:class:`SlideLimits`) *before* anything is allocated. Backends (:mod:`wsi_mil.slide.readers`) only open,
close and read raw regions; their errors are converted to :mod:`wsi_mil.errors` here.

One module because every read (region, level, downsampled, tiles searched for a corrupt one) goes
through the same clipping, compositing and budget checks of the one :class:`Slide` class.
"""
from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import cv2
import numpy as np

from wsi_mil.errors import MissingMPPError, SlideOpenError, SlideReadError, SlideTooLargeError
from wsi_mil.slide.identity import FileStamp, SlideFingerprint, fingerprint_file
from wsi_mil.slide.mpp import MPP_REMEDY, check_mpp, mpp_from_properties

logger = logging.getLogger(__name__)

#: Largest slide accepted (level-0 pixels); ~ 300,000 x 330,000. Real slides stay far below.
DEFAULT_MAX_SLIDE_PX = 100_000_000_000
#: Largest single read (pixels); 64 Mpx is 256 MiB as RGBA.
DEFAULT_MAX_READ_PX = 64 * 1024 * 1024
#: A failed read is searched tile by tile for the corrupt tiles when it spans at most this many.
MAX_TILES_SEARCHED = 4096


@dataclass(frozen=True)
class SlideLimits:
    """Pixel budgets checked before allocation."""

    max_slide_px: int = DEFAULT_MAX_SLIDE_PX
    max_read_px: int = DEFAULT_MAX_READ_PX


class Slide(ABC):
    """A whole-slide image: levels, level-0 microns per pixel, region and thumbnail reads.

    Subclasses wrap one backend and implement only :meth:`_read_rgba`, :meth:`_open_handle` and
    :meth:`_close_handle`; clipping, compositing, the pixel budget and error conversion live here.
    """

    backend_name: str = ""
    #: the file's identity when :func:`~wsi_mil.slide.readers.open_slide` opened (and checked) it
    file_stamp: FileStamp | None = None

    def __init__(self, path: Path, *, mpp: float | None = None, limits: SlideLimits | None = None) -> None:
        self.path = Path(path)
        self.slide_id: str = self.path.stem
        self.limits = limits or SlideLimits()
        self._handle: Any = None
        self._open_handle()
        handle = cast(Any, self._handle)
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(
            (int(w), int(h)) for w, h in handle.level_dimensions
        )
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in handle.level_downsamples)
        self.properties: dict[str, str] = {str(k): str(v) for k, v in handle.properties.items()}
        self._check_structure()
        self.mpp: float = self._resolve_mpp(mpp)
        self.mpp_source: str = "override" if mpp is not None else "metadata"
        #: opt-in tolerance (R4): corrupt tiles read as white and are listed in ``skipped_tiles``
        self.skip_unreadable: bool = False
        #: level-0 (x, y, w, h) of the file tiles skipped as unreadable (only with ``skip_unreadable``)
        self.skipped_tiles: list[tuple[int, int, int, int]] = []

    # --- backend hooks --------------------------------------------------------------------------
    @abstractmethod
    def _open_handle(self) -> None: ...

    def _close_handle(self) -> None:
        """Close the backend handle (both backends' handles have ``close()``)."""
        handle = getattr(self, "_handle", None)
        if handle is not None:
            handle.close()
            self._handle = None

    @abstractmethod
    def _read_rgba(self, location_px: tuple[int, int], level: int, size_px: tuple[int, int]) -> np.ndarray:
        """Read an in-bounds region; return an RGB or RGBA uint8 array of shape (h, w, 3|4)."""

    @property
    @abstractmethod
    def backend_version(self) -> str: ...

    @property
    @abstractmethod
    def associated_image_names(self) -> tuple[str, ...]: ...

    @abstractmethod
    def _read_associated(self, name: str) -> Any: ...

    # --- metadata -------------------------------------------------------------------------------
    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self.level_dimensions[0]

    @property
    def objective_power(self) -> float | None:
        for key in ("openslide.objective-power", "tiffslide.objective-power", "aperio.AppMag"):
            value = self.properties.get(key)
            if value not in (None, "", "None"):
                try:
                    return float(str(value))
                except ValueError:
                    continue
        return None

    def share_tile_cache(self, capacity_bytes: int) -> None:
        """Keep decoded tiles in a process-wide cache of ``capacity_bytes`` shared by all handles (OpenSlide);
        a backend without a tile cache of its own (tiffslide) has nothing to share and ignores it."""
        return None

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def fingerprint(self) -> SlideFingerprint:
        """What identifies this slide file (:mod:`wsi_mil.slide.identity`): recorded in every output."""
        return fingerprint_file(self.path, self.dimensions[0], self.dimensions[1], self.mpp)

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary, recorded in outputs."""
        return {
            "slide_id": self.slide_id,
            "path": str(self.path),
            "backend": self.backend_name,
            "backend_version": self.backend_version,
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "objective_power": self.objective_power,
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": list(self.level_downsamples),
            "associated_images": list(self.associated_image_names),
        }

    def _check_structure(self) -> None:
        w0, h0 = self.level_dimensions[0] if self.level_dimensions else (0, 0)
        if w0 <= 0 or h0 <= 0:
            raise SlideOpenError(f"{self.path}: the slide has no pixels (level 0 is {w0}x{h0}).")
        _check_budget(
            w0, h0, self.limits.max_slide_px, f"{self.path}: level 0 is", ", over the slide budget",
            "The header is probably corrupt; if the slide is real, raise the budget with `--max-slide-px`.",
        )
        previous = (w0, h0)
        for level, (w, h) in enumerate(self.level_dimensions[1:], start=1):
            ds = self.level_downsamples[level]
            if w > previous[0] or h > previous[1] or ds < self.level_downsamples[level - 1]:
                raise SlideOpenError(
                    f"{self.path}: level {level} ({w}x{h}, downsample {ds:g}) is larger than the level "
                    "before it; the pyramid is inconsistent. Re-export the slide."
                )
            expected_w = w0 / ds
            if abs(w - expected_w) > max(2.0, 0.02 * expected_w):
                raise SlideOpenError(
                    f"{self.path}: level {level} is {w} px wide but its downsample {ds:g} implies "
                    f"{expected_w:.0f}; the pyramid is inconsistent. Re-export the slide."
                )
            previous = (w, h)

    def _resolve_mpp(self, override: float | None) -> float:
        if override is not None:
            return check_mpp(float(override), f"{self.path} (override)")
        mpp_x, mpp_y = mpp_from_properties(self.properties)
        if mpp_x is None:
            raise MissingMPPError(
                f"Slide '{self.slide_id}' ({self.path}) does not state its microns per pixel in its metadata. "
                + MPP_REMEDY
            )
        if mpp_y is not None and abs(mpp_x - mpp_y) > 0.01 * mpp_x:
            logger.warning("%s: anisotropic pixels (mpp-x %.4f, mpp-y %.4f); using mpp-x", self.path, mpp_x, mpp_y)
        return check_mpp(mpp_x, str(self.path))

    # --- reads ----------------------------------------------------------------------------------
    def _check_read_budget(self, w: int, h: int, what: str) -> None:
        if w <= 0 or h <= 0:
            raise SlideReadError(f"{self.path}: {what} of {w}x{h} px is empty.")
        _check_budget(
            w, h, self.limits.max_read_px, f"{self.path}: {what} of", " is over the read budget",
            "Read a coarser level or a smaller region, or raise `max_read_px`.",
        )

    def read_region(self, location_px: tuple[int, int], level: int, size_px: tuple[int, int]) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of ``size_px=(w, h)`` pixels at ``level``, top-left at level-0 ``location_px``.

        Areas outside the slide are white, as are transparent areas.
        """
        if not 0 <= level < self.level_count:
            raise SlideReadError(f"{self.path}: level {level} does not exist (the slide has {self.level_count}).")
        w, h = int(size_px[0]), int(size_px[1])
        self._check_read_budget(w, h, f"a read at level {level}")
        x0, y0 = int(location_px[0]), int(location_px[1])
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        # Intersection with the level, in level pixels.
        lx, ly = x0 / ds, y0 / ds
        ix0, iy0 = max(0, math.floor(lx)), max(0, math.floor(ly))
        ix1, iy1 = min(lw, math.floor(lx) + w), min(lh, math.floor(ly) + h)
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        if ix1 <= ix0 or iy1 <= iy0:
            return out
        ox, oy = ix0 - math.floor(lx), iy0 - math.floor(ly)
        # Level-0 location of the first level pixel read: a multiple of the downsample, so that every
        # backend starts at the same level pixel (they round sub-pixel offsets differently).
        loc0 = (math.ceil(ix0 * ds - 1e-9), math.ceil(iy0 * ds - 1e-9))
        try:
            rgba = self._read_rgba(loc0, level, (ix1 - ix0, iy1 - iy0))
        except (SlideReadError, SlideTooLargeError):
            raise
        except Exception as exc:  # backend errors are converted here, at the boundary
            self._read_around_corrupt_tiles(exc, out, level, (ix0, iy0, ix1, iy1), (ox, oy), (x0, y0, w, h))
            return out
        out[oy : oy + rgba.shape[0], ox : ox + rgba.shape[1]] = _composite_on_white(rgba)
        return out

    def native_tile_px(self, level: int) -> tuple[int, int]:
        """The (width, height) of the file's own tiles at ``level`` (256 x 256 when unknown)."""
        sizes = []
        for dim in ("width", "height"):
            value = None
            for prefix in ("openslide", "tiffslide"):
                value = value or self.properties.get(f"{prefix}.level[{level}].tile-{dim}")
            try:
                sizes.append(max(16, int(str(value))))
            except (TypeError, ValueError):
                sizes.append(256)
        return sizes[0], sizes[1]

    def _read_around_corrupt_tiles(
        self,
        exc: Exception,
        out: np.ndarray,
        level: int,
        box: tuple[int, int, int, int],
        offset: tuple[int, int],
        request: tuple[int, int, int, int],
    ) -> None:
        """A region read failed: find the file tiles that do not decode (R4), with fresh handles.

        Reads the region again tile by tile (the file's own tile grid at ``level``) into ``out``. With
        :attr:`skip_unreadable` the corrupt tiles stay white and are counted in :attr:`skipped_tiles`
        (level-0 boxes); otherwise :class:`SlideReadError` names their level-0 locations.
        """
        ix0, iy0, ix1, iy1 = box
        ox, oy = offset
        x0, y0, w, h = request
        ds = self.level_downsamples[level]
        tw, th = self.native_tile_px(level)
        blocks = [
            (bx, by)
            for by in range(iy0 // th * th, iy1, th)
            for bx in range(ix0 // tw * tw, ix1, tw)
        ]
        bad: list[tuple[int, int, int, int]] = []  # level-0 (x, y, w, h) of the tiles that fail
        detail = f"{type(exc).__name__}: {exc}"
        if len(blocks) > MAX_TILES_SEARCHED:
            bad_unknown = True
        else:
            bad_unknown = False
            self.reopen()  # after a decode error OpenSlide fails every later read of this handle
            for bx, by in blocks:
                cx0, cy0 = max(bx, ix0), max(by, iy0)
                cx1, cy1 = min(bx + tw, ix1), min(by + th, iy1)
                loc0 = (math.ceil(cx0 * ds - 1e-9), math.ceil(cy0 * ds - 1e-9))
                try:
                    rgba = self._read_rgba(loc0, level, (cx1 - cx0, cy1 - cy0))
                except Exception:
                    bad.append((round(bx * ds), round(by * ds), round(tw * ds), round(th * ds)))
                    self.reopen()
                    continue
                ty, tx = oy + cy0 - iy0, ox + cx0 - ix0
                out[ty : ty + rgba.shape[0], tx : tx + rgba.shape[1]] = _composite_on_white(rgba)
        if bad and self.skip_unreadable:
            for b in bad:
                if b not in self.skipped_tiles:
                    self.skipped_tiles.append(b)
            logger.warning(
                "%s: skipped %d unreadable tile(s) at level %d, first at level-0 (%d, %d)",
                self.path, len(bad), level, bad[0][0], bad[0][1],
            )
            return
        if bad:
            where = ", ".join(f"({bx}, {by})" for bx, by, _, _ in bad[:5]) + (" ..." if len(bad) > 5 else "")
            bw, bh = bad[0][2], bad[0][3]
            message = (
                f"{self.path}: {len(bad)} corrupt tile(s) of {bw}x{bh} level-0 px at level {level}, top-left "
                f"at level-0 {where} (read at level-0 ({x0}, {y0}), size {w}x{h}): {detail}."
            )
        elif bad_unknown:
            message = f"{self.path}: could not decode the region at level-0 ({x0}, {y0}), level {level}, size {w}x{h}: {detail}."
        else:  # every tile decodes on a fresh handle: a transient error (I/O), not a corrupt tile
            message = (
                f"{self.path}: reading the region at level-0 ({x0}, {y0}), level {level}, size {w}x{h} failed "
                f"({detail}) although each of its tiles decodes; check the storage the slide is read from."
            )
        raise SlideReadError(
            message + " The slide file is probably corrupt at this location; re-export it, or allow skipping "
            "unreadable tiles (`--skip-unreadable-tiles`)."
        ) from exc

    def best_level_for_mpp(self, mpp: float) -> int:
        """The coarsest level whose resolution is at least as fine as ``mpp`` (never upsample if avoidable)."""
        best = 0
        for level in range(self.level_count):
            if self.level_mpp(level) <= mpp * 1.001:
                best = level
        return best

    def best_level_for_downsample(self, downsample: float) -> int:
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.001:
                best = level
        return best

    def read_region_mpp(self, location_px: tuple[int, int], size_px: tuple[int, int], mpp: float) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` at ``mpp`` µm/px, top-left at level-0 ``location_px``.

        Reads the best level (finest resolution not finer than needed) and resizes with area
        interpolation; the level-0 footprint is ``size_px * mpp / self.mpp``.
        """
        w, h = int(size_px[0]), int(size_px[1])
        self._check_read_budget(w, h, f"a read at {mpp} µm/px")
        level = self.best_level_for_mpp(mpp)
        scale = mpp / self.level_mpp(level)  # level pixels per output pixel (>= 1 unless upsampling)
        src_w, src_h = max(1, round(w * scale)), max(1, round(h * scale))
        region = self.read_region(location_px, level, (src_w, src_h))
        if (src_w, src_h) == (w, h):
            return region
        interp = cv2.INTER_AREA if scale > 1 else cv2.INTER_LINEAR
        return np.ascontiguousarray(cv2.resize(region, (w, h), interpolation=interp))

    def thumbnail_shape(self, max_side_px: int) -> tuple[int, int, float]:
        """(width, height, downsample) of a thumbnail whose longer side is ``max_side_px``."""
        w0, h0 = self.dimensions
        downsample = max(w0, h0) / max_side_px
        return max(1, round(w0 / downsample)), max(1, round(h0 / downsample)), downsample

    def read_downsampled(self, downsample: float) -> np.ndarray:
        """The whole slide at ``downsample`` relative to level 0 (e.g. for tissue detection).

        Reads the best level (never level 0 unless nothing coarser fits) within the read budget.
        """
        w0, h0 = self.dimensions
        out_w, out_h = max(1, round(w0 / downsample)), max(1, round(h0 / downsample))
        self._check_read_budget(out_w, out_h, f"a whole-slide read at downsample {downsample:g}")
        level = self.best_level_for_downsample(downsample)
        lw, lh = self.level_dimensions[level]
        self._check_read_budget(lw, lh, f"reading level {level} whole")
        region = self.read_region((0, 0), level, (lw, lh))
        if (lw, lh) == (out_w, out_h):
            return region
        return np.ascontiguousarray(cv2.resize(region, (out_w, out_h), interpolation=cv2.INTER_AREA))

    def get_thumbnail(self, max_side_px: int = 1024) -> np.ndarray:
        """RGB uint8 thumbnail whose longer side is ``max_side_px``."""
        _, _, downsample = self.thumbnail_shape(max_side_px)
        return self.read_downsampled(downsample)

    def read_associated_image(self, name: str) -> np.ndarray:
        if name not in self.associated_image_names:
            raise SlideReadError(
                f"{self.path}: no associated image '{name}'; it has {list(self.associated_image_names)}."
            )
        try:
            image = self._read_associated(name)
        except Exception as exc:
            raise SlideReadError(f"{self.path}: could not read associated image '{name}': {exc}") from exc
        return _composite_on_white(np.asarray(image.convert("RGBA") if hasattr(image, "convert") else image))

    # --- life cycle -----------------------------------------------------------------------------
    def reopen(self) -> None:
        """Open a fresh backend handle (after a decode error OpenSlide fails every later read)."""
        self._close_handle()
        self._open_handle()

    def close(self) -> None:
        self._close_handle()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"<{type(self).__name__} {self.slide_id} {w}x{h} mpp={self.mpp:.4f} levels={self.level_count}>"


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    if rgba.ndim == 2:
        return np.repeat(rgba[..., None], 3, axis=2).astype(np.uint8)
    if rgba.shape[2] == 3:
        return rgba.astype(np.uint8, copy=False)
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _check_budget(w: int, h: int, budget_px: int, what: str, over: str, advice: str) -> None:
    """:class:`SlideTooLargeError` before any allocation when ``w x h`` pixels exceed ``budget_px``."""
    if w * h > budget_px:
        raise SlideTooLargeError(f"{what} {w} x {h} px ({w * h:.3g} px){over} of {budget_px:.3g} px. {advice}")

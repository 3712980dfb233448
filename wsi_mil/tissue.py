"""Tissue detection at a fixed physical resolution: a mask, polygons in level-0 pixels, GeoJSON, QC.

The slide is read whole at ``seg_mpp`` (8 µm/px by default) from the best pyramid level through
:meth:`wsi_mil.slide.Slide.read_downsampled`, which refuses reads over the pixel budget before
allocating. Level 0 is read only when the slide has no coarser level (and then only if it fits the
read budget). Steps, all sized in microns so that results do not depend on the scanner:

1. HSV saturation (OpenCV). Pixels darker than ``min_value`` (black ink, debris, scanner edges)
   and pixels whose hue lies in ``pen_hue_range`` (green/cyan marker ink) are zeroed first.
   Blue ink is *not* removed: its hue overlaps haematoxylin.
2. Median blur of ``median_blur_um``.
3. Otsu's threshold, clipped to ``[min_saturation, max_saturation]``: the floor keeps an empty
   white slide empty (Otsu on pure noise finds a threshold in the noise); the ceiling keeps pale
   tissue when dense tissue on the same slide pulls Otsu up.
4. Morphological close of ``close_um`` (ellipse).
5. Holes smaller than ``min_hole_area_um2`` are filled; pieces smaller than
   ``min_tissue_area_um2`` are dropped. The default (0.05 mm²) keeps needle biopsies and small
   fragments, which CLAM's defaults drop.
6. Each piece's outline and holes, traced on the pixel edges (marching squares), become a polygon
   in level-0 pixels.

Nothing found is a legitimate outcome (``TissueResult.is_empty``); callers that need tissue use
:meth:`TissueResult.require_tissue`, which raises :class:`~wsi_mil.errors.NoTissueError`.

One module because detection, the polygons and their exports (GeoJSON, QC picture) share
:class:`TissueResult` and its level-0 geometry; split, each part would import the others.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wsi_mil.errors import ConfigError, NoTissueError, SlideTooLargeError
from wsi_mil.slide import Slide
from wsi_mil.store import atomic_write_bytes

logger = logging.getLogger(__name__)

#: Contour colours in the QC image (RGB).
QC_TISSUE_RGB: tuple[int, int, int] = (0, 170, 0)
QC_HOLE_RGB: tuple[int, int, int] = (0, 90, 255)
#: Largest deviation, in mask pixels, of a simplified polygon from the traced pixel-edge outline.
POLYGON_TOLERANCE_PX = 0.3


@dataclass(frozen=True)
class TissueParams:
    """Tissue detection settings; every size is physical (µm, µm²) or an 8-bit HSV level."""

    #: Resolution of the segmentation, µm/px (coarser when the slide would exceed ``max_seg_side_px``).
    seg_mpp: float = 8.0
    #: Lowest Otsu threshold on saturation (0-255): an empty white slide gives nothing, not noise.
    min_saturation: int = 15
    #: Highest Otsu threshold on saturation (0-255): pale tissue next to dense tissue is kept.
    max_saturation: int = 25
    #: Median blur kernel, µm (7 px at 8 µm/px); 0 disables.
    median_blur_um: float = 56.0
    #: Morphological close kernel, µm; 0 disables.
    close_um: float = 64.0
    #: Smallest tissue piece kept, µm² (0.05 mm²).
    min_tissue_area_um2: float = 50_000.0
    #: Smallest hole kept open, µm² (0.01 mm²); smaller holes are filled.
    min_hole_area_um2: float = 10_000.0
    #: Longest side of the segmentation image, px; bounds memory on very large slides.
    max_seg_side_px: int = 8192
    #: HSV value (0-255) at or below which a pixel is not tissue (black ink, debris); 0 disables.
    min_value: int = 35
    #: OpenCV hue range (0-180, inclusive) of marker ink removed (green/cyan); ``None`` disables.
    pen_hue_range: tuple[int, int] | None = (35, 100)

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.seg_mpp) and self.seg_mpp > 0):
            problems.append(f"seg_mpp must be > 0 µm/px, got {self.seg_mpp}")
        if not 0 <= self.min_saturation <= 255 or not 0 <= self.max_saturation <= 255:
            problems.append("min_saturation and max_saturation must lie in [0, 255]")
        if self.max_saturation < self.min_saturation:
            problems.append(
                f"max_saturation ({self.max_saturation}) is below min_saturation ({self.min_saturation})"
            )
        for name in ("median_blur_um", "close_um", "min_tissue_area_um2", "min_hole_area_um2"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                problems.append(f"{name} must be >= 0, got {value}")
        if self.max_seg_side_px < 64:
            problems.append(f"max_seg_side_px must be >= 64, got {self.max_seg_side_px}")
        if not 0 <= self.min_value <= 255:
            problems.append(f"min_value must lie in [0, 255], got {self.min_value}")
        if self.pen_hue_range is not None:
            lo, hi = self.pen_hue_range
            if not 0 <= lo <= hi <= 180:
                problems.append(f"pen_hue_range must satisfy 0 <= lo <= hi <= 180, got {self.pen_hue_range}")
        if problems:
            raise ConfigError("Invalid tissue parameters: " + "; ".join(problems) + ".")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class TissuePolygon:
    """One tissue piece: exterior ring and holes as ``(N, 2)`` float64 arrays of level-0 (x, y) pixels.

    Rings are open (the first point is not repeated). ``area_um2`` is the piece's tissue area
    (holes excluded), counted on the mask.
    """

    exterior: np.ndarray
    holes: tuple[np.ndarray, ...]
    area_um2: float


@dataclass(frozen=True, eq=False)
class TissueResult:
    """Tissue found on one slide."""

    #: Tissue mask at segmentation resolution, bool ``(h, w)``.
    mask: np.ndarray
    #: Actual µm/px of ``mask`` (``slide_mpp * downsample``).
    seg_mpp: float
    #: Level-0 pixels per mask pixel.
    downsample: float
    polygons: list[TissuePolygon]
    tissue_area_um2: float
    slide_id: str
    slide_mpp: float
    #: Level-0 (width, height) of the slide.
    slide_dimensions: tuple[int, int]
    #: Saturation threshold actually applied (0-255).
    threshold: int
    params: TissueParams = field(default_factory=TissueParams)

    # --- summary --------------------------------------------------------------------------------
    @property
    def n_pieces(self) -> int:
        return len(self.polygons)

    @property
    def is_empty(self) -> bool:
        return self.n_pieces == 0

    @property
    def tissue_area_mm2(self) -> float:
        return self.tissue_area_um2 / 1e6

    @property
    def downsample_xy(self) -> tuple[float, float]:
        """Exact level-0 pixels per mask pixel along x and y (the mask size is rounded)."""
        h, w = self.mask.shape
        return self.slide_dimensions[0] / w, self.slide_dimensions[1] / h

    def require_tissue(self) -> TissueResult:
        """Return ``self``, or raise :class:`NoTissueError` when nothing was found."""
        if self.is_empty:
            p = self.params
            raise NoTissueError(
                f"Slide '{self.slide_id}': no tissue found at {self.seg_mpp:.3g} µm/px (saturation threshold "
                f"{self.threshold}, smallest piece {p.min_tissue_area_um2 / 1e6:.3g} mm²). The slide is recorded "
                "as no_tissue. Check its QC thumbnail; for very faint staining lower `min_saturation`, for "
                "tiny fragments lower `min_tissue_area_um2`."
            )
        return self

    def summary(self) -> dict[str, Any]:
        return {
            "slide_id": self.slide_id,
            "n_pieces": self.n_pieces,
            "tissue_area_mm2": round(self.tissue_area_mm2, 6),
            "seg_mpp": self.seg_mpp,
            "threshold": self.threshold,
        }

    # --- exports --------------------------------------------------------------------------------
    def to_geojson(self) -> dict[str, Any]:
        """A GeoJSON FeatureCollection of ``Tissue`` annotations that QuPath imports (level-0 pixels).

        Rings are closed; exteriors are counter-clockwise and holes clockwise (RFC 7946).
        """
        from wsi_mil.store.geojson import annotation, feature_collection

        return feature_collection(
            [
                annotation(
                    [
                        _geojson_ring(poly.exterior, exterior=True),
                        *(_geojson_ring(h, exterior=False) for h in poly.holes),
                    ],
                    name=f"tissue {index + 1}",
                    class_name="Tissue",
                    color=QC_TISSUE_RGB,
                    area_um2=round(poly.area_um2, 1),
                )
                for index, poly in enumerate(self.polygons)
            ]
        )

    def save_geojson(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_geojson` atomically (temp file in the same folder + ``os.replace``)."""
        from wsi_mil.store.geojson import write_geojson

        return write_geojson(path, self.to_geojson())

    def qc_image(self, thumbnail_rgb: np.ndarray) -> np.ndarray:
        """``thumbnail_rgb`` (any size, whole slide) with contours drawn and a caption band below.

        Exteriors are drawn in green, holes in blue; the caption gives the slide id, mpp, tissue
        area and piece count (or says that no tissue was found).
        """
        thumb = np.ascontiguousarray(thumbnail_rgb[..., :3], dtype=np.uint8).copy()
        th, tw = thumb.shape[:2]
        w0, h0 = self.slide_dimensions
        scale = np.array([tw / w0, th / h0])
        thickness = max(1, round(max(th, tw) / 500))

        def to_px(ring: np.ndarray) -> np.ndarray:
            return np.round(ring * scale).astype(np.int32).reshape(-1, 1, 2)

        exteriors = [to_px(p.exterior) for p in self.polygons]
        holes = [to_px(h) for p in self.polygons for h in p.holes]
        cv2.polylines(thumb, exteriors, True, QC_TISSUE_RGB, thickness, cv2.LINE_AA)
        cv2.polylines(thumb, holes, True, QC_HOLE_RGB, thickness, cv2.LINE_AA)

        font_scale = max(0.4, min(1.0, tw / 1400))
        line_h = int(round(28 * font_scale)) + 4
        band = np.full((2 * line_h + 6, tw, 3), 255, np.uint8)
        if self.is_empty:
            line1, colour = f"{self.slide_id}: NO TISSUE FOUND", (200, 0, 0)
        else:
            line1 = f"{self.slide_id}: {self.tissue_area_mm2:.2f} mm2 tissue, {self.n_pieces} piece(s)"
            colour = (0, 0, 0)
        line2 = f"slide {self.slide_mpp:.4g} um/px, mask {self.seg_mpp:.3g} um/px, sat >= {self.threshold}"
        cv2.putText(
            band, line1, (6, line_h - 4), cv2.FONT_HERSHEY_SIMPLEX, font_scale, colour, 1, cv2.LINE_AA
        )
        y2 = 2 * line_h - 2
        cv2.putText(
            band, line2, (6, y2), cv2.FONT_HERSHEY_SIMPLEX, font_scale * 0.8, (60, 60, 60), 1, cv2.LINE_AA
        )
        # Legend, right-aligned on the second line: swatches for tissue and hole contours.
        x = tw - int(190 * font_scale)
        if x > tw // 2:
            for label, rgb in (("tissue", QC_TISSUE_RGB), ("hole", QC_HOLE_RGB)):
                cv2.line(band, (x, y2 - 5), (x + int(18 * font_scale), y2 - 5), rgb, 3)
                cv2.putText(
                    band,
                    label,
                    (x + int(22 * font_scale), y2),
                    cv2.FONT_HERSHEY_SIMPLEX,
                    font_scale * 0.7,
                    (60, 60, 60),
                    1,
                    cv2.LINE_AA,
                )
                x += int(95 * font_scale)
        return np.concatenate([thumb, band], axis=0)

    def save_qc_png(self, path: str | os.PathLike[str], slide: Slide, max_side_px: int = 1024) -> Path:
        """Write :meth:`qc_image` of the slide's thumbnail as PNG, atomically."""
        thumb = slide.get_thumbnail(max_side_px)
        image = self.qc_image(thumb)
        # fast zlib level: the QC picture is written for every slide while the model waits for CPU
        ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:  # pragma: no cover - OpenCV always encodes uint8 RGB
            raise RuntimeError(f"could not encode the QC image for {self.slide_id}")
        return atomic_write_bytes(path, buf.tobytes())


def detect_tissue(slide: Slide, params: TissueParams = TissueParams()) -> TissueResult:
    """Find tissue on ``slide`` at ``params.seg_mpp`` µm/px (see the module docstring for the steps).

    Raises :class:`~wsi_mil.errors.SlideTooLargeError` (before allocating) when the read needed
    at this resolution is over the slide's read budget, e.g. a large single-level slide.
    """
    w0, h0 = slide.dimensions
    downsample = max(1.0, params.seg_mpp / slide.mpp)
    budget_ds = max(w0, h0) / params.max_seg_side_px
    if budget_ds > downsample:
        logger.info(
            "%s: segmenting at %.3g µm/px instead of %.3g so the mask stays within %d px",
            slide.slide_id,
            slide.mpp * budget_ds,
            params.seg_mpp,
            params.max_seg_side_px,
        )
        downsample = budget_ds
    try:
        rgb = slide.read_downsampled(downsample)
    except SlideTooLargeError as exc:
        raise SlideTooLargeError(
            f"Tissue detection on '{slide.slide_id}' at {slide.mpp * downsample:.3g} µm/px needs a read over the "
            f"pixel budget ({exc}). The slide probably lacks a pyramid: convert it to a pyramidal TIFF, or raise "
            "`max_read_px`."
        ) from exc
    mask_h, mask_w = rgb.shape[:2]
    seg_mpp = slide.mpp * math.sqrt((w0 / mask_w) * (h0 / mask_h))
    mask, threshold = segment_rgb(rgb, seg_mpp, params)
    del rgb
    polygons, area_px = _polygons(mask, (w0 / mask_w, h0 / mask_h), seg_mpp)
    result = TissueResult(
        mask=mask,
        seg_mpp=seg_mpp,
        downsample=downsample,
        polygons=polygons,
        tissue_area_um2=float(area_px) * seg_mpp**2,
        slide_id=slide.slide_id,
        slide_mpp=slide.mpp,
        slide_dimensions=(w0, h0),
        threshold=threshold,
        params=params,
    )
    logger.info(
        "%s: %d tissue piece(s), %.3f mm² (mask %dx%d at %.3g µm/px, saturation >= %d)",
        slide.slide_id,
        result.n_pieces,
        result.tissue_area_mm2,
        mask_w,
        mask_h,
        seg_mpp,
        threshold,
    )
    return result


def segment_rgb(
    rgb: np.ndarray, seg_mpp: float, params: TissueParams = TissueParams()
) -> tuple[np.ndarray, int]:
    """Tissue mask (bool) of an RGB uint8 image at ``seg_mpp`` µm/px, and the saturation threshold used."""
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2HSV)
    sat = np.ascontiguousarray(hsv[..., 1])
    excluded = np.zeros(sat.shape, bool)
    if params.min_value > 0:
        excluded |= hsv[..., 2] <= params.min_value
    if params.pen_hue_range is not None:
        lo, hi = params.pen_hue_range
        hue = hsv[..., 0]
        excluded |= (hue >= lo) & (hue <= hi) & (sat > params.min_saturation)
    del hsv
    sat[excluded] = 0
    k_blur = _odd_kernel(params.median_blur_um / seg_mpp)
    if k_blur >= 3:
        sat = cv2.medianBlur(sat, k_blur)
    otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = int(min(max(int(otsu), params.min_saturation), params.max_saturation))
    # Tissue: saturation >= threshold (cv2.threshold keeps values strictly above its argument).
    _, binary = cv2.threshold(sat, threshold - 1, 1, cv2.THRESH_BINARY)
    del sat
    k_close = int(round(params.close_um / seg_mpp))
    if k_close >= 2:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k_close, k_close))
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, kernel)
    px_area_um2 = seg_mpp**2
    binary = _fill_small_holes(binary, params.min_hole_area_um2 / px_area_um2)
    binary = _drop_small_pieces(binary, params.min_tissue_area_um2 / px_area_um2)
    return binary.astype(bool), threshold


# --- helpers ----------------------------------------------------------------------------------------
def _odd_kernel(size_px: float) -> int:
    k = int(round(size_px))
    return k + 1 if k % 2 == 0 else k


def _fill_small_holes(binary: np.ndarray, min_hole_px: float) -> np.ndarray:
    """Fill background regions (4-connected) that do not touch the border and are under ``min_hole_px``."""
    if min_hole_px <= 0:
        return binary
    background = (binary == 0).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(background, connectivity=4)
    if n <= 1:
        return binary
    h, w = binary.shape
    x, y, bw, bh, area = (stats[:, i] for i in range(5))
    touches_border = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
    fill = (~touches_border) & (area < min_hole_px)
    fill[0] = False  # label 0 is the tissue itself
    if not fill.any():
        return binary
    out = binary.copy()
    out[fill[labels]] = 1
    return out


def _drop_small_pieces(binary: np.ndarray, min_piece_px: float) -> np.ndarray:
    """Remove tissue pieces (8-connected, as the polygons trace them) under ``min_piece_px``."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if n <= 1:
        return binary
    keep = stats[:, cv2.CC_STAT_AREA] >= max(min_piece_px, 1)
    keep[0] = False
    if keep[1:].all():
        return binary
    return keep[labels].astype(np.uint8)


def _polygons(
    mask: np.ndarray, downsample_xy: tuple[float, float], seg_mpp: float
) -> tuple[list[TissuePolygon], int]:
    """Polygons in level-0 pixels from a bool mask, and its tissue pixel count.

    Pieces are 8-connected components. Each piece's outline and holes are traced on the pixel
    edges (marching squares at 0.5 on the piece's own bounding box, so memory stays bounded by the
    largest piece), then simplified by at most ``POLYGON_TOLERANCE_PX`` mask pixels.
    """
    from skimage.measure import find_contours

    binary = mask.astype(np.uint8)
    total = int(binary.sum())
    if total == 0:
        return [], 0
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    scale = np.array(downsample_xy, dtype=np.float64)
    polygons = []
    for label in range(1, n):
        x0, y0, bw, bh, area_px = (int(v) for v in stats[label])
        piece = np.pad(labels[y0 : y0 + bh, x0 : x0 + bw] == label, 1)
        rings = find_contours(piece.astype(np.float32), 0.5, fully_connected="high")
        if not rings:  # pragma: no cover - a non-empty component always has an outline
            continue
        level0 = []
        for ring in rings:
            ring = _simplify(ring)
            # Padded crop index -> mask index -> level-0 pixels (mask pixel i spans [i, i + 1) * ds).
            xy = ring[:, ::-1] + (x0 - 1 + 0.5, y0 - 1 + 0.5)
            level0.append(xy * scale)
        areas = [abs(_signed_area(r)) for r in level0]
        outer = int(np.argmax(areas))
        holes = tuple(r for i, r in enumerate(level0) if i != outer)
        polygons.append(TissuePolygon(level0[outer], holes, float(area_px) * seg_mpp**2))
    # Largest piece first: stable and convenient for QC.
    polygons.sort(key=lambda p: -p.area_um2)
    return polygons, total


def _simplify(ring: np.ndarray) -> np.ndarray:
    """Douglas-Peucker simplification (OpenCV's, in C) of a closed ``(row, col)`` contour to an open
    ring, at most ``POLYGON_TOLERANCE_PX`` mask pixels from the traced outline."""
    points = ring[:-1] if len(ring) > 1 and np.array_equal(ring[0], ring[-1]) else ring
    simplified = cv2.approxPolyDP(points.astype(np.float32).reshape(-1, 1, 2), POLYGON_TOLERANCE_PX, True)
    return simplified.reshape(-1, 2).astype(np.float64)


def _signed_area(ring: np.ndarray) -> float:
    """Shoelace area of an open ring (positive when counter-clockwise in x-right, y-up axes)."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _geojson_ring(ring: np.ndarray, *, exterior: bool) -> list[list[float]]:
    pts = np.asarray(ring, dtype=np.float64)
    if len(pts) >= 3 and (_signed_area(pts) < 0) == exterior:
        pts = pts[::-1]
    coords = [[round(float(px), 2), round(float(py), 2)] for px, py in pts]
    if coords and coords[0] != coords[-1]:
        coords.append(coords[0])
    while len(coords) < 4 and coords:  # GeoJSON rings need 4 positions; degenerate pieces repeat a point
        coords.insert(1, coords[0])
    return coords

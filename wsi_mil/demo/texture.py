"""Tissue texture for the sample cohort: real tissue quilted from soft-seamed patches, with a stain jitter.

* :class:`ResampledSource` - one source image at the work resolution, with its tissue-rich crop positions;
* :class:`Texture` - that source with one slide's stain jitter, cut into randomly turned patches;
* :func:`match_mean_colour` - shifts an image's mean tissue colour (in CIELAB) onto another's;
* :func:`quilt` - fills an area with such patches joined by soft, meandering seams;
* :func:`smooth_noise` - low-frequency noise, also used for the seams and by :mod:`~wsi_mil.demo.shapes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class ResampledSource:
    """A source image at the work resolution, the crops of it that hold tissue, and its seam weights."""

    image: np.ndarray
    positions: np.ndarray  # (n, 2) top-left (y, x) of tissue-rich crops
    patch_px: int
    overlap_px: int
    seams: tuple[np.ndarray, ...]  # seam weights (p, p), a few variants


class Texture:
    """A source at the work resolution with this slide's stain jitter, cut into soft-seamed patches.

    The jitter (a factor per RGB channel's optical density) is drawn from ``rng``, or is ``stain``
    (another texture's :attr:`stain`) to stain two sources of one slide alike.
    """

    def __init__(
        self, base: ResampledSource, rng: np.random.Generator, *, stain: tuple[float, ...] | None = None
    ) -> None:
        if stain is None:
            stain = tuple(float(rng.uniform(0.88, 1.12)) for _ in range(3))
        self.stain = stain
        self.image = _stain_jitter(base.image, stain)
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


def seam_weight(p: int, overlap_px: int, rng: np.random.Generator) -> np.ndarray:
    """Blending weight of a patch: 0 on its border, 1 from ``overlap_px`` inwards, a meandering ramp between.

    The wobble is bounded so that two overlapping patches never both weigh 0.
    """
    idx = np.arange(p, dtype=np.float32)
    to_edge = np.minimum(idx, idx[::-1])
    edge = np.minimum(to_edge[:, None], to_edge[None, :])
    wobble = np.clip(smooth_noise((p, p), overlap_px * 0.5, rng) * 0.12, -0.2, 0.2) * overlap_px
    return np.clip((edge + wobble - overlap_px * 0.25) / (overlap_px * 0.5), 0.0, 1.0).astype(np.float32)


def _stain_jitter(img: np.ndarray, stain: tuple[float, ...]) -> np.ndarray:
    """Scale each channel's optical density by its factor in ``stain`` (near 1; a per-channel LUT)."""
    levels = np.arange(256, dtype=np.float64)
    od = -np.log((levels + 1.0) / 256.0)
    out = np.empty_like(img)
    for c, k in enumerate(stain):
        lut = np.clip(256.0 * np.exp(-k * od) - 1.0, 0, 255).round().astype(np.uint8)
        out[..., c] = cv2.LUT(img[..., c], lut)
    return out


def match_mean_colour(
    img: np.ndarray, ref: np.ndarray, img_tissue: np.ndarray, ref_tissue: np.ndarray
) -> np.ndarray:
    """``img`` (RGB uint8) shifted in CIELAB so that its mean over ``img_tissue`` equals ``ref``'s over
    ``ref_tissue`` (a mean-only Reinhard transfer: the spread of colours, hence the morphology, is kept)."""
    lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB).astype(np.float32)
    ref_lab = cv2.cvtColor(ref, cv2.COLOR_RGB2LAB).astype(np.float32)
    shift = ref_lab[ref_tissue].mean(axis=0) - lab[img_tissue].mean(axis=0)
    lab = np.clip(lab + shift + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB))


def quilt(
    texture: Texture, height: int, width: int, rng: np.random.Generator, need: np.ndarray | None = None
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


def smooth_noise(shape: tuple[int, int], sigma_px: float, rng: np.random.Generator) -> np.ndarray:
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



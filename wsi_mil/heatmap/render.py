"""The heatmap canvas, its colours and the figure a pathologist reads.

The canvas is the slide thumbnail's pixel grid (``canvas_mpp`` µm/px, or the whole slide within
``max_side_px``): canvas pixel ``(i, j)`` covers level-0 ``[j·sx, (j+1)·sx) x [i·sy, (i+1)·sy)`` with
``sx = width0 / W`` and ``sy = height0 / H``, exactly the grid of ``Slide.read_downsampled``.

Painting: a tile's level-0 footprint ``[x, x+F) x [y, y+F)`` covers the canvas pixels whose centres
lie inside it (a tile smaller than a canvas pixel covers the pixel holding its centre). Scores are
accumulated on a sum canvas and a count canvas with 2-D difference arrays (four ``bincount`` corner
updates per tile, then two cumulative sums), so the cost is O(tiles + canvas pixels) whatever the
tile size and overlap; overlapping tiles are averaged. The result is clipped to the tissue mask
(``segment_rgb`` on the thumbnail itself, so mask and canvas share one grid) and optionally smoothed
with a Gaussian (sigma in µm) by normalised convolution inside the scored area.

Scores (see :func:`tile_values`):

* ``probability`` (the default): the tile's own probability of one class from the shared classifier,
  on the fixed scale 0 to 1: the same on every slide, and a slide the model finds negative stays cold.
* ``attention`` / ``fixed`` (the attention default): ``log2(n·α)`` clipped to ``±attention_log2_max``; 0 is
  uniform attention (α = 1/n), +4 is 16x the uniform share. The same scale on every slide, but α sums to 1
  over each slide's tiles, so some tiles of every slide, negative or not, stand out.
* ``attention`` / ``rank``: per-slide rank percentile of α (0 = lowest, 100 = highest); every slide spans
  the whole colour range (an option, not a default).

One module because the canvas geometry, the colour scales and the figure are one drawing
pipeline that shares :class:`CanvasGeometry` and :class:`TileValues`.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from wsi_mil.cohort.scoring import describe_scored_by
from wsi_mil.config.heatmap import HeatmapConfig
from wsi_mil.errors import ConfigError
from wsi_mil.store.score_file import SlideScores

if TYPE_CHECKING:
    from matplotlib.axes import Axes

logger = logging.getLogger(__name__)

#: Longest canvas side accepted (px); a finer canvas would be a multi-hundred-MB figure.
MAX_CANVAS_SIDE_PX = 8192
#: Clipping to the tissue mask is skipped (with a warning) when it would remove more than this share
#: of the scored canvas: the mask then missed the tissue the tiles were cut from (faint stain).
MAX_CLIPPED_SHARE = 0.5
#: Finest resolution at which tissue is segmented for clipping, µm/px (a finer canvas is a small slide).
SEG_MPP = 2.0


# --- geometry ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CanvasGeometry:
    """The canvas grid over a slide: ``width`` x ``height`` pixels for level-0 ``slide_dimensions``."""

    width: int
    height: int
    slide_dimensions: tuple[int, int]
    slide_mpp: float
    #: Level-0 px per canvas px requested (the grid itself uses :attr:`downsample_x`/:attr:`downsample_y`).
    downsample: float

    @property
    def downsample_x(self) -> float:
        return self.slide_dimensions[0] / self.width

    @property
    def downsample_y(self) -> float:
        return self.slide_dimensions[1] / self.height

    @property
    def canvas_mpp(self) -> float:
        return self.slide_mpp * math.sqrt(self.downsample_x * self.downsample_y)

    def to_canvas(self, x0: float, y0: float) -> tuple[float, float]:
        """Level-0 point -> canvas coordinates (pixel units, 0 = the left/top edge of pixel 0)."""
        return x0 / self.downsample_x, y0 / self.downsample_y


def canvas_geometry(
    slide_dimensions: tuple[int, int], slide_mpp: float, canvas_mpp: float | None = None, max_side_px: int = 2048
) -> CanvasGeometry:
    """The canvas of a slide: at ``canvas_mpp`` µm/px, or with its longer side ``max_side_px``.

    Its size is ``round(w0 / downsample) x round(h0 / downsample)``, the size of
    ``Slide.read_downsampled(downsample)``, so the thumbnail and the canvas share one grid.
    """
    w0, h0 = slide_dimensions
    downsample = canvas_mpp / slide_mpp if canvas_mpp is not None else max(w0, h0) / max_side_px
    downsample = max(1.0, downsample)
    width, height = max(1, round(w0 / downsample)), max(1, round(h0 / downsample))
    if max(width, height) > MAX_CANVAS_SIDE_PX:
        raise ConfigError(
            f"A canvas at {slide_mpp * downsample:.3g} µm/px would be {width} x {height} px, over "
            f"{MAX_CANVAS_SIDE_PX} px: raise `canvas_mpp` (or leave it empty and set `max_side_px`)."
        )
    return CanvasGeometry(width, height, (int(w0), int(h0)), float(slide_mpp), float(downsample))


# --- scores --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class TileValues:
    """The value painted for each tile and the scale it is shown on."""

    values: np.ndarray  # (N,) float64
    kind: str  # "attention" | "probability"
    scale: str  # "rank" | "fixed" | "probability"
    vmin: float
    vmax: float
    #: Colour bar title, e.g. "Attention rank within this slide (percentile)".
    label: str
    #: One line for captions and the review page, e.g. "attention, rank percentile within slide".
    short: str
    class_name: str | None
    ticks: tuple[float, ...]
    tick_labels: tuple[str, ...]


def resolve_class(scores: SlideScores, class_name: str | None) -> str:
    """The class whose probability is shown: the configured one, else the second class of a binary
    model (the positive class, e.g. ``tumor`` in ``[normal, tumor]``), else the predicted class."""
    if class_name is not None:
        if scores.n_tiles or scores.class_names:
            scores.class_index(class_name)  # raises naming the classes
        return class_name
    if len(scores.class_names) == 2:
        return scores.class_names[1]
    if scores.predicted_class in scores.class_names:
        return scores.predicted_class
    return scores.class_names[int(np.argmax(scores.bag_probabilities))] if scores.class_names else ""


def rank_percentile(values: np.ndarray) -> np.ndarray:
    """Rank of each value as a percentile, 0 (lowest) to 100 (highest); ties share their mean rank."""
    n = values.shape[0]
    if n == 0:
        return np.zeros(0, np.float64)
    if n == 1:
        return np.full(1, 100.0)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # average rank (0-based) of each run of equal values
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], n]
    mean_rank = (starts + ends - 1) / 2.0
    ranks = np.empty(n, np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks * (100.0 / (n - 1))


def tile_values(scores: SlideScores, cfg: HeatmapConfig) -> TileValues:
    """The per-tile values to paint, following ``cfg.score`` and ``cfg.attention_scale``."""
    n = scores.n_tiles
    if cfg.score == "probability":
        cls = resolve_class(scores, cfg.class_name)
        values = scores.instance_probabilities[:, scores.class_index(cls)].astype(np.float64) if n else np.zeros(0)
        return TileValues(
            values, "probability", "probability", 0.0, 1.0,
            f"P({cls}) of each tile (fixed scale 0 to 1, the same on every slide)", f"P({cls}) per tile, fixed 0-1", cls,
            (0.0, 0.25, 0.5, 0.75, 1.0), ("0", "0.25", "0.5", "0.75", "1"),
        )
    if cfg.attention_scale == "rank":
        return TileValues(
            rank_percentile(scores.attention), "attention", "rank", 0.0, 100.0,
            "Attention rank within this slide (percentile)", "attention, rank percentile within slide", None,
            (0.0, 25.0, 50.0, 75.0, 100.0), ("0\nlowest", "25", "50", "75", "100\nhighest"),
        )
    top = float(cfg.attention_log2_max)
    with np.errstate(divide="ignore"):
        values = np.log2(np.maximum(scores.attention * n, 0.0)) if n else np.zeros(0)
    values = np.clip(values, -top, top)
    step = max(1, int(math.ceil(top / 4)))
    exps = list(range(-int(top) // step * step, int(top) + 1, step))
    labels = tuple(("1×" if e == 0 else (f"{2**e:g}×" if e > 0 else f"1/{2**-e:g}×")) for e in exps)
    return TileValues(
        values, "attention", "fixed", -top, top,
        f"Attention relative to a uniform share (n·α, log scale, same on every slide; clipped at {2**top:g}×)",
        f"attention n·α, fixed log2 scale ±{top:g}", None, tuple(float(e) for e in exps), labels,
    )


# --- painting ------------------------------------------------------------------------------------------
def _spans(start: np.ndarray, size: float, scale: float, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Canvas index spans ``[lo, hi)`` of level-0 intervals ``[start, start + size)`` (pixel centres inside)."""
    lo = np.ceil(start / scale - 0.5)
    hi = np.ceil((start + size) / scale - 0.5)
    tiny = hi <= lo
    if tiny.any():
        centre = np.floor((start[tiny] + size / 2.0) / scale)
        lo[tiny], hi[tiny] = centre, centre + 1
    return np.clip(lo, 0, limit).astype(np.int64), np.clip(hi, 0, limit).astype(np.int64)


def paint_canvas(
    coords: np.ndarray, footprint_px: float, values: np.ndarray, geometry: CanvasGeometry, *,
    origin_px: tuple[float, float] = (0.0, 0.0), warn_outside: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean value per canvas pixel over the tiles covering it (NaN where none) and the tile count (int32).

    ``origin_px``: the level-0 point at the canvas's top-left corner (a window of a larger grid, e.g. one
    deep-zoom tile of the viewer); ``warn_outside=False`` drops tiles outside the window silently.
    """
    h, w = geometry.height, geometry.width
    if coords.shape[0] == 0:
        return np.full((h, w), np.nan, np.float32), np.zeros((h, w), np.int32)
    xy = np.asarray(coords, np.float64) - np.asarray(origin_px, np.float64)
    j0, j1 = _spans(xy[:, 0], footprint_px, geometry.downsample_x, w)
    i0, i1 = _spans(xy[:, 1], footprint_px, geometry.downsample_y, h)
    keep = (j1 > j0) & (i1 > i0)
    if not keep.all() and warn_outside:
        logger.warning("%d of %d tiles lie outside the slide and are not painted", int((~keep).sum()), len(keep))
    if not keep.all():
        j0, j1, i0, i1, values = j0[keep], j1[keep], i0[keep], i1[keep], values[keep]
    stride = w + 1
    index = np.concatenate([i0 * stride + j0, i0 * stride + j1, i1 * stride + j0, i1 * stride + j1])
    size = (h + 1) * stride
    ones = np.ones(values.shape[0], np.float64)
    signs = (1.0, -1.0, -1.0, 1.0)
    v = np.asarray(values, np.float64)
    total = np.bincount(index, weights=np.concatenate([s * v for s in signs]), minlength=size)
    count = np.bincount(index, weights=np.concatenate([s * ones for s in signs]), minlength=size)
    total_c = total.reshape(h + 1, stride).cumsum(0).cumsum(1)[:h, :w]
    count_c = np.rint(count.reshape(h + 1, stride).cumsum(0).cumsum(1)[:h, :w]).astype(np.int32)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count_c > 0, total_c / np.maximum(count_c, 1), np.nan).astype(np.float32)
    return mean, count_c


def clip_to_tissue(heat: np.ndarray, tissue: np.ndarray | None, slide_id: str = "") -> tuple[np.ndarray, bool]:
    """``heat`` with NaN outside ``tissue`` (same shape), and whether clipping was applied."""
    if tissue is None:
        return heat, False
    scored = np.isfinite(heat)
    n_scored = int(scored.sum())
    if n_scored == 0:
        return heat, False
    removed = int((scored & ~tissue).sum())
    if removed > MAX_CLIPPED_SHARE * n_scored:
        logger.warning(
            "%s: the tissue mask misses %.0f%% of the tiled area (faint staining?); the heatmap is not clipped",
            slide_id, 100.0 * removed / n_scored,
        )
        return heat, False
    out = heat.copy()
    out[~tissue] = np.nan
    return out, True


def smooth(heat: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian smoothing by normalised convolution inside the finite area; NaN stays NaN."""
    if sigma_px < 0.3:
        return heat
    valid = np.isfinite(heat)
    if not valid.any():
        return heat
    filled = np.where(valid, heat, 0.0).astype(np.float32)
    weight = valid.astype(np.float32)
    num = cv2.GaussianBlur(filled, (0, 0), sigmaX=sigma_px, borderType=cv2.BORDER_CONSTANT)
    den = cv2.GaussianBlur(weight, (0, 0), sigmaX=sigma_px, borderType=cv2.BORDER_CONSTANT)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(valid & (den > 1e-6), num / np.maximum(den, 1e-6), np.nan)
    return out.astype(np.float32)


# --- colours -------------------------------------------------------------------------------------------
def colorize(heat: np.ndarray, cmap_name: str, vmin: float, vmax: float) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 colours of ``heat`` (black where NaN) and the finite mask."""
    from matplotlib import colormaps

    valid = np.isfinite(heat)
    rgb = np.zeros((*heat.shape, 3), np.uint8)
    if valid.any():
        span = vmax - vmin if vmax > vmin else 1.0
        norm = np.clip((heat[valid].astype(np.float64) - vmin) / span, 0.0, 1.0)
        rgb[valid] = colormaps[cmap_name](norm, bytes=True)[:, :3]
    return rgb, valid


def overlay(thumbnail: np.ndarray, heat: np.ndarray, cfg: HeatmapConfig, vmin: float, vmax: float) -> np.ndarray:
    """The thumbnail with the heatmap colours blended over the scored tissue; the rest left plain."""
    colours, valid = colorize(heat, cfg.colormap, vmin, vmax)
    out = np.array(thumbnail[..., :3], dtype=np.uint8, copy=True)
    if valid.any():
        a = float(cfg.overlay_alpha)
        base = out[valid].astype(np.float32)
        out[valid] = np.clip(base * (1.0 - a) + colours[valid].astype(np.float32) * a + 0.5, 0, 255).astype(np.uint8)
    return out


def tissue_mask(thumbnail: np.ndarray, geometry: CanvasGeometry, cfg: HeatmapConfig) -> np.ndarray:
    """Tissue on the canvas grid: the tissue detector's steps run on the thumbnail itself."""
    from wsi_mil.tissue import TissueParams, segment_rgb

    t = cfg.tissue
    params = TissueParams(
        seg_mpp=geometry.canvas_mpp,
        min_saturation=t.min_saturation,
        max_saturation=max(25, t.min_saturation),
        median_blur_um=t.median_blur_um,
        close_um=t.close_um,
        min_tissue_area_um2=t.min_tissue_area_um2,
        min_hole_area_um2=t.min_hole_area_um2,
    )
    h, w = thumbnail.shape[:2]
    scale = geometry.canvas_mpp / SEG_MPP
    image, seg_mpp = thumbnail, geometry.canvas_mpp
    if scale < 1.0:  # a fine canvas (a small slide): segment at SEG_MPP and scale the mask up
        image = cv2.resize(thumbnail, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        seg_mpp = geometry.canvas_mpp * w / image.shape[1]
    # Pad with white glass so that the morphological close does not spread tissue lying near the
    # slide's edge onto the edge (OpenCV's erosion treats the outside as foreground).
    pad = int(math.ceil((t.close_um + t.median_blur_um) / seg_mpp)) + 2
    padded = cv2.copyMakeBorder(np.ascontiguousarray(image[..., :3]), pad, pad, pad, pad, cv2.BORDER_CONSTANT,
                                value=(255, 255, 255))
    mask, _ = segment_rgb(padded, seg_mpp, replace(params, seg_mpp=seg_mpp))
    mask = mask[pad : pad + image.shape[0], pad : pad + image.shape[1]]
    if mask.shape != (h, w):
        mask = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) >= 0.5
    return np.asarray(mask, dtype=bool)


# --- the figure ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Caption:
    slide_id: str
    predicted_class: str
    probability: float
    label: str
    model: str
    n_checkpoints: int
    detail: str  # third line: tiles, resolution, encoder
    scored_by: str = ""  # held_out:fold_3, ensemble:5, in_sample:ensemble:5 (see wsi_mil.cohort.scoring)


def _resize_to(image: np.ndarray, width_px: int) -> np.ndarray:
    h, w = image.shape[:2]
    if w <= width_px:
        return image
    height_px = max(1, round(h * width_px / w))
    return np.ascontiguousarray(cv2.resize(image, (width_px, height_px), interpolation=cv2.INTER_AREA))


def _nice_scale_bar_um(width_um: float) -> float:
    target = width_um / 5.0
    for v in (50, 100, 200, 250, 500, 1000, 2000, 2500, 5000, 10000, 20000, 50000):
        if v >= target * 0.7:
            return float(v)
    return 50000.0


def _scale_bar(ax: Axes, width_px: int, height_px: int, canvas_mpp: float, display_scale: float) -> None:
    from matplotlib.patches import Rectangle

    length_um = _nice_scale_bar_um(width_px / display_scale * canvas_mpp)
    length_px = length_um / canvas_mpp * display_scale
    margin = 0.03 * width_px
    bar_h = max(2.0, 0.008 * height_px)
    y = height_px - margin - bar_h
    ax.add_patch(Rectangle((margin, y), length_px, bar_h, color="black", lw=0))
    text = f"{length_um / 1000:g} mm" if length_um >= 1000 else f"{length_um:g} µm"
    ax.text(margin + length_px / 2, y - bar_h, text, ha="center", va="bottom", fontsize=10, color="black")


def render_figure(
    thumbnail: np.ndarray,
    overlay_rgb: np.ndarray | None,
    values: TileValues | None,
    caption: Caption,
    geometry: CanvasGeometry,
    cfg: HeatmapConfig,
    *,
    message: str | None = None,
) -> bytes:
    """PNG bytes of the figure: caption, thumbnail | overlay, colour bar with its meaning.

    ``overlay_rgb=None`` draws ``message`` (e.g. "no tiles") over the plain thumbnail instead.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    dpi = cfg.figure_dpi
    h, w = thumbnail.shape[:2]
    aspect = h / w
    panel_w = min(7.0, 8.0 / aspect)
    panel_h = panel_w * aspect
    gap, side = 0.3, 0.35
    top_in, bottom_in = 1.45, 1.25
    fig_w = 2 * panel_w + gap + 2 * side
    fig_h = panel_h + top_in + bottom_in
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    panel_px = int(math.ceil(panel_w * dpi * 1.5))
    thumb_show = _resize_to(thumbnail, panel_px)
    display_scale = thumb_show.shape[1] / w

    def box(x_in: float) -> tuple[float, float, float, float]:
        return (x_in / fig_w, bottom_in / fig_h, panel_w / fig_w, panel_h / fig_h)

    ax_t = fig.add_axes(box(side))
    ax_o = fig.add_axes(box(side + panel_w + gap))
    ax_t.imshow(thumb_show, interpolation="antialiased")
    ax_t.set_title("Slide", fontsize=12, loc="left")
    _scale_bar(ax_t, thumb_show.shape[1], thumb_show.shape[0], geometry.canvas_mpp, display_scale)
    if overlay_rgb is not None and values is not None:
        ax_o.imshow(_resize_to(overlay_rgb, panel_px), interpolation="antialiased")
        ax_o.set_title(f"Heatmap: {values.short}", fontsize=12, loc="left")
        cax = fig.add_axes(
            ((side + panel_w + gap + 0.1 * panel_w) / fig_w, 0.62 / fig_h, 0.8 * panel_w / fig_w, 0.16 / fig_h)
        )
        mappable = ScalarMappable(norm=Normalize(values.vmin, values.vmax), cmap=colormaps[cfg.colormap])
        bar = fig.colorbar(mappable, cax=cax, orientation="horizontal")
        bar.set_ticks(list(values.ticks))
        bar.set_ticklabels(list(values.tick_labels))
        bar.ax.tick_params(labelsize=10)
        bar.ax.set_title(values.label, fontsize=11, pad=4)
        fig.text(
            (side + panel_w + gap) / fig_w, 0.08 / fig_h,
            "Uncoloured: not scored (glass, or tissue without a tile).", fontsize=9, color="#555555",
        )
    else:
        ax_o.imshow(_resize_to(thumbnail, panel_px), interpolation="antialiased", alpha=0.35)
        ax_o.set_title("Heatmap", fontsize=12, loc="left")
        ax_o.text(
            0.5, 0.5, message or "nothing to show", transform=ax_o.transAxes, ha="center", va="center",
            fontsize=20, color="#b00000", fontweight="bold",
            bbox={"facecolor": "white", "edgecolor": "#b00000", "boxstyle": "round,pad=0.4"},
        )
    for ax in (ax_t, ax_o):
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_color("#bbbbbb")
    # Caption: slide id (and the verdict when the truth is known); prediction, truth, model; details.
    left = side / fig_w
    fig.text(left, 1 - 0.42 / fig_h, caption.slide_id, fontsize=16, fontweight="bold", va="baseline")
    if caption.label and caption.predicted_class:
        correct = caption.label == caption.predicted_class
        verdict, colour = ("✓ prediction correct", "#1b7a1b") if correct else ("✗ misclassified", "#b00000")
        fig.text(1 - side / fig_w, 1 - 0.42 / fig_h, verdict, fontsize=14, fontweight="bold", color=colour,
                 ha="right", va="baseline")
    prob = "" if not math.isfinite(caption.probability) else f" (P = {caption.probability:.2f})"
    truth = caption.label or "unknown"
    how = describe_scored_by(caption.scored_by, caption.n_checkpoints)
    model = caption.model + (f" ({how})" if how else "")
    in_sample = caption.scored_by.startswith("in_sample:")
    fig.text(left, 1 - 0.72 / fig_h,
             f"Prediction: {caption.predicted_class or 'none'}{prob}    True label: {truth}    Model: {model}",
             fontsize=12, va="baseline", color="#b00000" if in_sample else "black",
             fontweight="bold" if in_sample else "normal")
    fig.text(left, 1 - 0.96 / fig_h, caption.detail, fontsize=10, va="baseline", color="#444444")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white", pil_kwargs={"compress_level": 2})
    return buf.getvalue()


def render_colorbar(values: TileValues, cfg: HeatmapConfig) -> bytes:
    """PNG bytes of a stand-alone colour bar (the review page's legend)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 1.05), dpi=100, facecolor="white")
    FigureCanvasAgg(fig)
    cax = fig.add_axes((0.08, 0.42, 0.84, 0.2))
    mappable = ScalarMappable(norm=Normalize(values.vmin, values.vmax), cmap=colormaps[cfg.colormap])
    bar = fig.colorbar(mappable, cax=cax, orientation="horizontal")
    bar.set_ticks(list(values.ticks))
    bar.set_ticklabels([t.replace("\n", " ") for t in values.tick_labels])
    bar.ax.tick_params(labelsize=9)
    bar.ax.set_title(values.label, fontsize=10, pad=4)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, facecolor="white")
    return buf.getvalue()


def describe(values: TileValues) -> dict[str, Any]:
    """Attributes recorded with the heatmap array."""
    return {
        "score_kind": values.kind,
        "score_scale": values.scale,
        "score_label": values.label,
        "vmin": values.vmin,
        "vmax": values.vmax,
        "class_name": values.class_name or "",
    }

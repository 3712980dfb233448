"""``run_heatmap``: heatmaps, top tiles, GeoJSON and the review page for a batch of slides.

Renders from the stored coordinates and scores of ``wsi-mil predict`` (``OUT/scores/<slide_id>.h5``);
features are never re-extracted. Slides are matched to score files by slide id (the file stem).
Per slide, ``DIR/<slide_id>/`` receives:

* ``heatmap.png``     the figure: caption, thumbnail | overlay, colour bar with its meaning;
* ``heatmap.h5``      the canvas and per-tile arrays (schema: :mod:`wsi_mil.store.heatmap_file`);
* ``thumbnail.jpg``, ``overlay.jpg``  page-sized images for the review page;
* ``top_tiles/``, ``bottom_tiles/``, ``top_tiles.csv``, ``bottom_tiles.csv``, ``top_tiles.png``,
  ``bottom_tiles.png``  the k highest / lowest tiles at the model's µm/px, their index and contact sheets;
* ``tiles.geojson``   every tile as a level-0 square with its scores as QuPath measurements;
* ``summary.json``    what the review page shows.

and ``DIR`` gets ``manifest.csv`` (one row per slide, slides without scores included), ``config.yaml``,
``legend.png`` and ``index.html``. A slide whose scores hold no tiles gets a figure saying "no tiles".

One module because the batch loop and the per-slide rendering share the slide's canvas geometry,
scores and record; drawing lives in :mod:`wsi_mil.heatmap`, the file formats in :mod:`wsi_mil.store`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wsi_mil.config import write_config
from wsi_mil.config.heatmap import HeatmapConfig
from wsi_mil.errors import BagFileError, InputError, SlideIdentityError
from wsi_mil.heatmap.export import (
    contact_sheet,
    export_tiles,
    label_image,
    rank_tiles,
    write_png,
)
from wsi_mil.heatmap.render import (
    CanvasGeometry,
    Caption,
    TileValues,
    canvas_geometry,
    clip_to_tissue,
    describe,
    overlay,
    paint_canvas,
    render_figure,
    resolve_class,
    smooth,
    tile_values,
    tissue_mask,
)
from wsi_mil.runs.slide_loop import BatchSummary, check_unique_ids, run_batch
from wsi_mil.slide import Slide, SlideFingerprint, SlideLimits, load_mpp_overrides, open_slide
from wsi_mil.store import RecordStore, atomic_write_bytes, atomic_write_json, ensure_writable_dir
from wsi_mil.store.geojson import tile_detections_text, write_geojson
from wsi_mil.store.heatmap_file import write_heatmap_h5
from wsi_mil.store.score_file import SlideScores, empty_scores, empty_slides, find_scores, load_scores

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = (
    "slide_id", "status", "n_tiles", "predicted_class", "probability", "label", "model", "score",
    "canvas_mpp", "tissue_clipped", "note", "seconds", "error_class", "error", "path",
)
PAGE_IMAGE_PX = 1024
NO_TILES = "no tiles"


@dataclass
class HeatmapRun:
    """The outcome of :func:`run_heatmap`."""

    summary: BatchSummary
    out_dir: Path
    missing_scores: list[str] = field(default_factory=list)
    unused_scores: list[str] = field(default_factory=list)
    index_html: Path | None = None

    @property
    def exit_code(self) -> int:
        return self.summary.exit_code

    def text(self) -> str:
        lines = [self.summary.text()]
        if self.missing_scores:
            shown = ", ".join(self.missing_scores[:10]) + (" ..." if len(self.missing_scores) > 10 else "")
            lines.append(
                f"  {len(self.missing_scores)} slide(s) without scores (not rendered; see the predict/extract "
                f"manifests): {shown}"
            )
        if self.unused_scores:
            shown = ", ".join(self.unused_scores[:10]) + (" ..." if len(self.unused_scores) > 10 else "")
            lines.append(f"  {len(self.unused_scores)} score file(s) without a slide among the inputs: {shown}")
        return "\n".join(lines)


def run_heatmap(
    slides: Sequence[Path],
    scores: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cfg: HeatmapConfig | None = None,
    *,
    progress: bool | None = None,
) -> HeatmapRun:
    """Render every slide of ``slides`` that has a score file in ``scores`` (a predict output folder).

    One bad slide never stops the batch: it is recorded as ``failed`` in ``manifest.csv`` and the run's
    exit code is 1. Raises :class:`InputError` when no slide has scores.
    """
    cfg = cfg or HeatmapConfig()
    check_unique_ids(Path(p) for p in slides)  # R21
    out = ensure_writable_dir(out_dir)
    score_files = find_scores(scores)
    root = Path(scores)
    empty, empty_classes, empty_model = empty_slides(root if (root / "scores").is_dir() else root.parent)
    by_id = {Path(p).stem: Path(p) for p in slides}
    matched = [p for sid, p in by_id.items() if sid in score_files or sid in empty]
    missing = sorted(sid for sid in by_id if sid not in score_files and sid not in empty)
    unused = sorted(sid for sid in score_files if sid not in by_id)
    if not matched:
        raise InputError(
            f"None of the {len(by_id)} slide(s) has a score file in {scores} ({len(score_files)} score file(s): "
            f"{', '.join(sorted(score_files)[:5]) or 'none'}). Slides and score files are matched by slide id "
            "(the file name without suffix); give the --out folder of `wsi-mil predict` run on these slides."
        )
    if missing:
        logger.warning("%d slide(s) have no scores and are not rendered: %s", len(missing), ", ".join(missing[:20]))
    write_config(cfg, out / "config.yaml")
    store = RecordStore(out, MANIFEST_COLUMNS)
    for sid in missing:
        store.write({"slide_id": sid, "path": str(by_id[sid]), "status": "no_scores",
                     "note": f"no scores/{sid}.h5 in {scores}"})
    overrides = load_mpp_overrides(cfg.slide.mpp_override_csv) if cfg.slide.mpp_override_csv else {}

    def process(path: Path) -> dict[str, Any]:
        if path.stem in score_files:
            slide_scores = load_scores(score_files[path.stem])
        else:  # R17: predict skipped it for having no tiles
            slide_scores = empty_scores(path.stem, empty_classes, empty_model)
        return render_slide(path, slide_scores, out / path.stem, cfg, mpp_override=overrides.get(path.stem))

    summary = run_batch(matched, out, process, MANIFEST_COLUMNS, progress=progress, desc="heatmaps")
    index = None
    try:
        from wsi_mil.heatmap.review import write_review_page

        index = write_review_page(out, cfg.colormap)
    except OSError as exc:
        logger.error("could not write the review page: %s", exc)
    return HeatmapRun(summary, out, missing, unused, index)


# --- one slide -----------------------------------------------------------------------------------------
def _open(path: Path, scores: SlideScores, cfg: HeatmapConfig, mpp_override: float | None) -> Slide:
    """Open the slide at the µm/px its tiles were cut with (unless the user overrides it)."""
    mpp = cfg.slide.mpp_override or mpp_override or scores.slide_mpp
    limits = SlideLimits(max_slide_px=cfg.slide.max_slide_px, max_read_px=cfg.slide.max_read_px)
    slide = open_slide(path, backend=cfg.slide.backend, mpp=mpp, limits=limits)
    if scores.slide_mpp is not None and abs(slide.mpp - scores.slide_mpp) > 0.01 * scores.slide_mpp:
        logger.warning(
            "%s: opened at %.4g µm/px but its tiles were cut at slide µm/px %.4g; tile reads use %.4g",
            slide.slide_id, slide.mpp, scores.slide_mpp, slide.mpp,
        )
    return slide


def _check_identity(scores: SlideScores, slide: Slide, ignore: bool) -> SlideFingerprint:
    """Refuse scores made from another slide file than ``slide`` (same id, other pixels)."""
    fingerprint = slide.fingerprint()
    recorded = SlideFingerprint.from_json(scores.slide_fingerprint)
    if recorded is None:
        logger.info("%s: the scores record no slide fingerprint (older files); identity not checked", slide.slide_id)
        return fingerprint
    differences = recorded.differences(fingerprint)
    if not differences:
        return fingerprint
    what = (
        f"the scores {scores.path} were made from another slide file than {slide.path} "
        f"({'; '.join(differences)})"
    )
    if ignore:
        logger.warning("%s: %s; drawn anyway (ignore_slide_identity)", slide.slide_id, what)
        return fingerprint
    raise SlideIdentityError(
        f"Slide '{slide.slide_id}': {what}. Give the slide these scores came from; for a re-scanned slide "
        "whose tiles still fit, pass --ignore-slide-identity."
    )


def _check_fit(scores: SlideScores, slide: Slide) -> None:
    if scores.n_tiles == 0:
        return
    w0, h0 = slide.dimensions
    max_x, max_y = int(scores.coords[:, 0].max()), int(scores.coords[:, 1].max())
    min_xy = int(scores.coords.min())
    if max_x >= w0 or max_y >= h0 or min_xy < -scores.footprint_px:
        raise BagFileError(
            f"Scores of slide '{scores.slide_id}' do not fit the slide {slide.path} ({w0} x {h0} px): tile "
            f"coordinates reach ({max_x}, {max_y}). The score file belongs to another slide or another "
            "resolution; check that slides and scores come from the same cohort."
        )


def _caption(scores: SlideScores, values: TileValues | None, geometry: CanvasGeometry, slide: Slide) -> Caption:
    details = [
        f"{scores.n_tiles:,} tiles of {scores.tile_px} px at {scores.mpp:.3g} µm/px",
        f"slide {slide.mpp:.4g} µm/px",
        f"heatmap {geometry.canvas_mpp:.3g} µm/px",
    ]
    if scores.encoder_name:
        details.append(f"features: {scores.encoder_name}")
    return Caption(
        slide_id=scores.slide_id,
        predicted_class=scores.predicted_class,
        probability=scores.predicted_probability,
        label=scores.label,
        model=scores.model or "unknown model",
        n_checkpoints=scores.n_checkpoints,
        detail=" · ".join(details),
        scored_by=scores.scored_by,
    )


def _page_image(path: Path, rgb: np.ndarray) -> None:
    h, w = rgb.shape[:2]
    scale = PAGE_IMAGE_PX / max(h, w)
    if scale < 1:
        rgb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:  # pragma: no cover
        raise ValueError(f"could not encode {path}")
    atomic_write_bytes(path, buf.tobytes())


def render_slide(
    path: Path, scores: SlideScores, out_dir: Path, cfg: HeatmapConfig, *, mpp_override: float | None = None
) -> dict[str, Any]:
    """Everything for one slide (see the module docstring); returns its manifest record fields."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        timings[name] = round(now - t0, 4)
        t0 = now

    out_dir.mkdir(parents=True, exist_ok=True)
    with _open(path, scores, cfg, mpp_override) as slide:
        fingerprint = _check_identity(scores, slide, cfg.ignore_slide_identity)
        _check_fit(scores, slide)
        geometry = canvas_geometry(slide.dimensions, slide.mpp, cfg.canvas_mpp, cfg.max_side_px)
        thumbnail = slide.read_downsampled(geometry.downsample)
        if thumbnail.shape[:2] != (geometry.height, geometry.width):  # pragma: no cover - same rounding
            thumbnail = cv2.resize(thumbnail, (geometry.width, geometry.height), interpolation=cv2.INTER_AREA)
        lap("thumbnail")
        values = tile_values(scores, cfg)
        cls = resolve_class(scores, cfg.class_name)
        caption = _caption(scores, values, geometry, slide)
        _page_image(out_dir / "thumbnail.jpg", thumbnail)
        n = scores.n_tiles
        if n == 0:
            return _render_no_tiles(slide, scores, out_dir, cfg, thumbnail, geometry, values, caption, cls)
        heat, count = paint_canvas(scores.coords, scores.footprint_px, values.values, geometry)
        lap("paint")
        tissue = tissue_mask(thumbnail, geometry, cfg) if cfg.clip_to_tissue else None
        heat, clipped = clip_to_tissue(heat, tissue, scores.slide_id)
        if cfg.smooth_sigma_um > 0:
            heat = smooth(heat, cfg.smooth_sigma_um / geometry.canvas_mpp)
        lap("tissue")
        over = overlay(thumbnail, heat, cfg, values.vmin, values.vmax)
        _page_image(out_dir / "overlay.jpg", over)
        figure = render_figure(thumbnail, over, values, caption, geometry, cfg)
        atomic_write_bytes(out_dir / "heatmap.png", figure)
        lap("figure")
        attrs = {
            "slide_id": scores.slide_id,
            "canvas_mpp": geometry.canvas_mpp,
            "downsample": geometry.downsample,
            "downsample_x": geometry.downsample_x,
            "downsample_y": geometry.downsample_y,
            "slide_dimensions": list(geometry.slide_dimensions),
            "slide_mpp": slide.mpp,
            "footprint_px": scores.footprint_px,
            "tile_px": scores.tile_px,
            "tile_mpp": scores.mpp,
            "tissue_clipped": clipped,
            "smooth_sigma_um": cfg.smooth_sigma_um,
            "colormap": cfg.colormap,
            "class_names": list(scores.class_names),
            "slide_fingerprint": fingerprint.to_json(),
            **describe(values),
        }
        write_heatmap_h5(
            out_dir / "heatmap.h5", heatmap=heat, count=count, tissue=tissue, coords=scores.coords,
            scores=values.values, attention=scores.attention,
            instance_probabilities=scores.instance_probabilities, attrs=attrs,
        )
        lap("hdf5")
        tiles = _export_top_bottom(slide, scores, values, out_dir, cfg, cls)
        lap("tiles")
        if cfg.write_geojson:
            write_geojson(out_dir / "tiles.geojson", tile_detections_text(
                scores.coords, scores.footprint_px, _measurements(scores, values), cfg.geojson_object_type))
        lap("geojson")
    _write_summary(out_dir, scores, values, cls, geometry, tiles, note="", clipped=clipped)
    logger.info("%s: %d tiles rendered (%s)", scores.slide_id, n,
                ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    return _record(scores, values, geometry, clipped, note="", timings=timings)


def _measurements(scores: SlideScores, values: TileValues) -> dict[str, np.ndarray]:
    n = scores.n_tiles
    meas: dict[str, np.ndarray] = {
        "attention": scores.attention,
        "attention n*alpha": scores.attention * n,
    }
    if values.scale == "rank":
        meas["attention rank percentile"] = values.values
    elif values.scale == "fixed":
        meas["attention log2(n*alpha)"] = values.values
    for k, name in enumerate(scores.class_names):
        meas[f"P({name})"] = scores.instance_probabilities[:, k]
    return meas


def _export_top_bottom(
    slide: Slide, scores: SlideScores, values: TileValues, out_dir: Path, cfg: HeatmapConfig, cls: str
) -> dict[str, list[dict[str, Any]]]:
    top, bottom = rank_tiles(values.values, scores.attention, cfg.top_k)
    extra: dict[str, np.ndarray] = {"attention": scores.attention}
    if cls in scores.class_names and scores.n_tiles:
        extra[f"P({cls})"] = scores.instance_probabilities[:, scores.class_index(cls)]
    out: dict[str, list[dict[str, Any]]] = {}
    for which, idx in (("top", top), ("bottom", bottom)):
        rows, images = export_tiles(
            slide, out_dir, which, idx, scores.coords, values.values, extra, scores.tile_px, scores.mpp
        )
        title = f"{'Highest' if which == 'top' else 'Lowest'} {len(rows)} tiles: {values.short}"
        write_png(out_dir / f"{which}_tiles.png", contact_sheet(images, rows, title))
        out[which] = [
            {"rank": r.rank, "x": r.x, "y": r.y, "score": r.score, "file": r.file} for r in rows
        ]
    return out


def _render_no_tiles(
    slide: Slide, scores: SlideScores, out_dir: Path, cfg: HeatmapConfig, thumbnail: np.ndarray,
    geometry: CanvasGeometry, values: TileValues, caption: Caption, cls: str,
) -> dict[str, Any]:
    """R17: a slide whose scores hold no tile gets a figure and a record saying "no tiles"."""
    logger.warning("%s: the score file holds no tiles; writing a 'no tiles' figure", scores.slide_id)
    figure = render_figure(thumbnail, None, None, caption, geometry, cfg,
                           message="no tiles\n(nothing was scored on this slide)")
    atomic_write_bytes(out_dir / "heatmap.png", figure)
    _page_image(out_dir / "overlay.jpg", label_image(thumbnail, NO_TILES))
    empty = np.zeros(0)
    heat = np.full((geometry.height, geometry.width), np.nan, np.float32)
    write_heatmap_h5(
        out_dir / "heatmap.h5", heatmap=heat, count=np.zeros(heat.shape, np.int32), tissue=None,
        coords=scores.coords, scores=empty, attention=empty, instance_probabilities=scores.instance_probabilities,
        attrs={"slide_id": scores.slide_id, "canvas_mpp": geometry.canvas_mpp, "downsample": geometry.downsample,
               "note": NO_TILES, **describe(values)},
    )
    tiles = _export_top_bottom(slide, scores, values, out_dir, cfg, cls)
    if cfg.write_geojson:
        write_geojson(out_dir / "tiles.geojson", tile_detections_text(scores.coords, scores.footprint_px, {}))
    _write_summary(out_dir, scores, values, cls, geometry, tiles, note=NO_TILES, clipped=False)
    return _record(scores, values, geometry, False, note=NO_TILES, timings={})


def _record(
    scores: SlideScores, values: TileValues, geometry: CanvasGeometry, clipped: bool, *, note: str,
    timings: dict[str, float],
) -> dict[str, Any]:
    return {
        "status": "done",
        "n_tiles": scores.n_tiles,
        "predicted_class": scores.predicted_class,
        "probability": scores.predicted_probability,
        "label": scores.label,
        "model": scores.model,
        "score": values.short,
        "canvas_mpp": round(geometry.canvas_mpp, 4),
        "tissue_clipped": clipped,
        "note": note,
        "timings": timings,
    }


def _sort_probability(scores: SlideScores, cls: str) -> float:
    if len(scores.class_names) == 2 and cls in scores.class_names:
        return scores.probability_of(cls)
    return scores.predicted_probability


def _write_summary(
    out_dir: Path, scores: SlideScores, values: TileValues, cls: str, geometry: CanvasGeometry,
    tiles: dict[str, list[dict[str, Any]]], *, note: str, clipped: bool,
) -> None:
    summary = {
        "slide_id": scores.slide_id,
        "n_tiles": scores.n_tiles,
        "predicted_class": scores.predicted_class,
        "probability": scores.predicted_probability,
        "class_probabilities": dict(zip(scores.class_names, scores.bag_probabilities, strict=True)),
        "sort_class": cls,
        "sort_probability": _sort_probability(scores, cls),
        "label": scores.label,
        "model": scores.model,
        "n_checkpoints": scores.n_checkpoints,
        "scored_by": scores.scored_by,
        "note": note,
        "tissue_clipped": clipped,
        "canvas_mpp": geometry.canvas_mpp,
        "score": {
            "kind": values.kind, "scale": values.scale, "label": values.label, "short": values.short,
            "vmin": values.vmin, "vmax": values.vmax, "class_name": values.class_name,
            "ticks": list(values.ticks), "tick_labels": list(values.tick_labels),
        },
        "files": {
            "figure": "heatmap.png", "thumbnail": "thumbnail.jpg", "overlay": "overlay.jpg",
            "top_sheet": "top_tiles.png", "bottom_sheet": "bottom_tiles.png", "top_csv": "top_tiles.csv",
            "bottom_csv": "bottom_tiles.csv", "geojson": "tiles.geojson", "hdf5": "heatmap.h5",
        },
        "tiles": tiles,
    }
    atomic_write_json(out_dir / "summary.json", summary)

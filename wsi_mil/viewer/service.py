"""The viewer's work, without the web: tiles, overlays, tile crops, read-outs and slide descriptions.

:class:`ViewerService` answers every request of :mod:`wsi_mil.viewer.app` from the :class:`Catalog` of one
run: a slide id that the catalog does not list, or lists as not viewable, is a :class:`NotServedError`
(the app's 404); a level, column, row, class or layer that is not one of the slide's is a
:class:`~wsi_mil.slide.deepzoom.TileRequestError` or :class:`InputError` (the app's 400). Slide handles
come from the bounded :class:`~wsi_mil.viewer.cache.SlideCache`; encoded tiles are kept in a bounded
LRU (``tile_cache_mb``), per-slide :class:`~wsi_mil.viewer.evidence.Evidence` in another (16 slides).
A slide whose file disappears while the server runs is marked missing and the others are served.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import cv2
import numpy as np

from wsi_mil.cohort.scoring import describe_scored_by
from wsi_mil.config.view import ViewConfig
from wsi_mil.errors import InputError, NotServedError, SlideOpenError
from wsi_mil.slide import Slide, choose_reader
from wsi_mil.slide.deepzoom import DeepZoomGrid, TileRequestError, read_tile
from wsi_mil.store.geojson import read_polygons
from wsi_mil.store.heatmap_file import read_heatmap_h5
from wsi_mil.viewer.cache import SlideCache
from wsi_mil.viewer.catalog import Catalog, SlideEntry
from wsi_mil.viewer.evidence import LAYERS, Evidence, LayerName, describe_layer

logger = logging.getLogger(__name__)

__all__ = ["ViewerService"]

T = TypeVar("T")
_EVIDENCE_SLIDES = 16
CROP_PX = 160


class _ByteLRU:
    """Encoded tiles by key, at most ``max_bytes`` in all (least recently used dropped first)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get_or_make(self, key: tuple[Any, ...], make: Callable[[], bytes]) -> bytes:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        data = make()
        if len(data) <= self.max_bytes:
            with self._lock:
                if key not in self._items:
                    self._items[key] = data
                    self._size += len(data)
                while self._size > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self._size -= len(old)
        return data

    def drop(self, slide_id: str) -> None:
        with self._lock:
            for key in [k for k in self._items if k[1] == slide_id]:
                self._size -= len(self._items.pop(key))


def _jpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 RGB
        raise ValueError("could not encode a JPEG tile")
    return buf.tobytes()


#: flat colour cells: the "sub" filter and run-length coding encode a tile in under 1 ms to a few kB
_PNG_FAST = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
if hasattr(cv2, "IMWRITE_PNG_FILTER"):  # OpenCV >= 4.11
    _PNG_FAST += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB]


def _png_rgba(rgba: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgba), cv2.COLOR_RGBA2BGRA), _PNG_FAST)
    if not ok:  # pragma: no cover
        raise ValueError("could not encode a PNG tile")
    return buf.tobytes()


class ViewerService:
    """Everything the viewer serves for one run (see the module docstring)."""

    def __init__(self, catalog: Catalog, cfg: ViewConfig | None = None) -> None:
        self.catalog = catalog
        self.cfg = cfg or ViewConfig()
        self.slides = SlideCache(self._open, max_slides=self.cfg.max_open_slides,
                                 handles_per_slide=self.cfg.handles_per_slide)
        self.tiles = _ByteLRU(self.cfg.tile_cache_mb * 1024 * 1024)
        self._evidence: OrderedDict[str, Evidence] = OrderedDict()
        self._lock = threading.Lock()

    def close(self) -> None:
        self.slides.close()

    # --- slides -------------------------------------------------------------------------------------
    def _open(self, slide_id: str) -> Slide:
        entry = self.catalog.entries[slide_id]
        slide = self.catalog.open_slide(entry)
        fast = choose_reader(slide, self.catalog.backend)
        if fast is not slide:
            slide.close()
        fast.share_tile_cache(self.cfg.decode_cache_mb * 1024 * 1024)
        return fast

    def entry(self, slide_id: str) -> SlideEntry:
        """The viewable slide ``slide_id``; :class:`NotServedError` for any other id."""
        entry = self.catalog.get(slide_id)
        if entry is None:
            raise NotServedError("no such slide in this run")
        self.catalog.verify(slide_id)
        if not entry.viewable:
            raise NotServedError(f"slide '{slide_id}' is {entry.status}: {entry.reason}")
        return entry

    def grid(self, entry: SlideEntry) -> DeepZoomGrid:
        assert entry.dimensions is not None
        return DeepZoomGrid(*entry.dimensions)

    def _with_slide(self, entry: SlideEntry, read: Callable[[Slide], T]) -> T:
        try:
            with self.slides.borrow(entry.slide_id) as slide:
                return read(slide)
        except SlideOpenError as exc:
            if entry.path is None or not entry.path.is_file():
                self.catalog.mark_missing(entry, "the slide file is missing (it was removed while the viewer ran)")
                self.slides.forget(entry.slide_id)
                self.tiles.drop(entry.slide_id)
                raise NotServedError(f"slide '{entry.slide_id}' is missing") from exc
            raise

    def evidence(self, entry: SlideEntry) -> Evidence:
        with self._lock:
            ev = self._evidence.get(entry.slide_id)
            if ev is not None:
                self._evidence.move_to_end(entry.slide_id)
                return ev
        ev = Evidence(self.catalog.load_scores(entry), self.cfg.colormap)
        with self._lock:
            self._evidence[entry.slide_id] = ev
            while len(self._evidence) > _EVIDENCE_SLIDES:
                self._evidence.popitem(last=False)
        return ev

    # --- tiles --------------------------------------------------------------------------------------
    def slide_tile(self, slide_id: str, level: str | int, col: str | int, row: str | int) -> bytes:
        """JPEG bytes of one deep-zoom tile of the slide."""
        entry = self.entry(slide_id)
        grid = self.grid(entry)
        lv, c, r = grid.check(level, col, row)

        def make() -> bytes:
            rgb = self._with_slide(entry, lambda s: read_tile(s, grid, lv, c, r))
            return _jpeg(rgb, self.cfg.jpeg_quality)

        return self.tiles.get_or_make(("slide", entry.slide_id, lv, c, r), make)

    def layer_name(self, name: str) -> LayerName:
        for known in LAYERS:
            if name == known:
                return known
        raise NotServedError(f"no layer {name[:40]!r}; layers are {', '.join(LAYERS)}")

    def class_name(self, ev: Evidence, name: str | None) -> str | None:
        if not name:
            return None
        if name not in ev.class_names():
            raise InputError(f"class {name[:40]!r} is not one of the model's classes {list(ev.class_names())}")
        return name

    def overlay_tile(
        self, slide_id: str, layer: str, level: str | int, col: str | int, row: str | int, *, fmt: str = "png",
        class_name: str | None = None, smoothed: bool = False,
    ) -> bytes:
        """One deep-zoom tile of the evidence layer: RGBA PNG (transparent where unscored), or JPEG with the
        colours over the slide (what the PNG looks like at full opacity)."""
        entry = self.entry(slide_id)
        name = self.layer_name(layer)
        if fmt not in ("png", "jpeg"):
            raise NotServedError("overlay tiles are .png or .jpeg")
        grid = self.grid(entry)
        lv, c, r = grid.check(level, col, row)
        ev = self.evidence(entry)
        cls = self.class_name(ev, class_name)

        def make() -> bytes:
            rgba = ev.paint(ev.layer(name, cls), grid.tile_box(lv, c, r), smoothed=smoothed)
            if fmt == "png":
                return _png_rgba(rgba)
            rgb = self._with_slide(entry, lambda s: read_tile(s, grid, lv, c, r))
            scored = rgba[..., 3] > 0
            rgb[scored] = rgba[scored, :3]
            return _jpeg(rgb, self.cfg.jpeg_quality)

        key = ("overlay", entry.slide_id, name, cls or "", smoothed, fmt, lv, c, r)
        return self.tiles.get_or_make(key, make)

    def crop(self, slide_id: str, index: str | int) -> bytes:
        """JPEG of scored tile ``index`` as the model saw it (its µm/px), at most :data:`CROP_PX` wide."""
        entry = self.entry(slide_id)
        ev = self.evidence(entry)
        if isinstance(index, str) and not (index.isascii() and index.isdigit() and len(index) <= 9):
            raise TileRequestError(f"the tile index must be a whole number, got {index[:40]!r}")
        i = int(index)
        if not 0 <= i < ev.n:
            raise TileRequestError(f"tile {i} is outside the slide's {ev.n} tiles")
        x, y = (int(v) for v in ev.coords[i])
        f = max(1, round(ev.footprint))
        s = ev.scores

        def read(slide: Slide) -> np.ndarray:
            if s.tile_px > 0 and math.isfinite(s.mpp):
                return slide.read_region_mpp((x, y), (s.tile_px, s.tile_px), s.mpp)
            level = slide.best_level_for_downsample(f / CROP_PX)
            ds = slide.level_downsamples[level]
            side = max(1, round(f / ds))
            return slide.read_region((x, y), level, (side, side))

        def make() -> bytes:
            rgb = self._with_slide(entry, read)
            if rgb.shape[1] > CROP_PX:
                rgb = cv2.resize(rgb, (CROP_PX, CROP_PX), interpolation=cv2.INTER_AREA)
            return _jpeg(rgb, 90)

        return self.tiles.get_or_make(("crop", entry.slide_id, i), make)

    # --- descriptions -------------------------------------------------------------------------------
    def cohort(self) -> dict[str, Any]:
        """Every slide of the run, viewable or not (with the reason)."""
        self.catalog.verify_all()
        slides = []
        for entry in self.catalog.entries.values():
            d = entry.describe()
            d["scored_by_text"] = describe_scored_by(entry.scored_by, entry.n_checkpoints)
            d["in_sample"] = entry.scored_by.startswith("in_sample:")
            if entry.viewable and entry.dimensions is not None:
                d["thumb_level"] = self._thumb_level(entry)
            slides.append(d)
        binary = len(self.catalog.class_names) == 2
        return {
            "kind": self.catalog.kind,
            "classes": list(self.catalog.class_names),
            "positive_class": self.catalog.class_names[1] if binary else None,
            "slides": slides,
            "review": self.catalog.review_dir is not None,
        }

    def _thumb_level(self, entry: SlideEntry) -> int:
        grid = self.grid(entry)
        level = grid.max_level
        while level > 0 and max(grid.level_dimensions(level)) > grid.tile_px:
            level -= 1
        return level

    def slide_info(self, slide_id: str) -> dict[str, Any]:
        """What the slide page needs: geometry, prediction, layers and neighbours; the reason when not viewable."""
        entry = self.catalog.get(slide_id)
        if entry is None:
            raise NotServedError("no such slide in this run")
        self.catalog.verify(slide_id)
        ids = self.catalog.viewable_ids()
        out: dict[str, Any] = {
            **entry.describe(),
            "scored_by_text": describe_scored_by(entry.scored_by, entry.n_checkpoints),
            "in_sample": entry.scored_by.startswith("in_sample:"),
            "viewable": entry.viewable,
        }
        if slide_id in ids:
            k = ids.index(slide_id)
            out["previous"] = ids[k - 1] if k > 0 else None
            out["next"] = ids[k + 1] if k + 1 < len(ids) else None
        if not entry.viewable:
            return out
        grid = self.grid(entry)
        ev = self.evidence(entry)
        s = ev.scores
        out.update({
            "width": grid.width, "height": grid.height, "tile_size": grid.tile_px, "overlap": grid.overlap_px,
            "max_level": grid.max_level, "mpp": entry.mpp,
            "n_tiles": ev.n, "footprint": ev.footprint, "tile_px": s.tile_px,
            "tile_mpp": s.mpp if math.isfinite(s.mpp) else None,
            "classes": list(ev.class_names()), "default_class": ev.default_class,
            "default_layer": self.cfg.layer, "layers": list(LAYERS), "colormap": self.cfg.colormap,
            "lut": ["#{:02x}{:02x}{:02x}".format(*(int(v) for v in rgb)) for rgb in ev.lut],
            "top_k": self.cfg.top_k, "has_tissue": self._has_tissue(entry),
            "has_annotations": entry.annotation_path is not None,
            "review": f"/review/index.html#{slide_id}" if entry.summary_path is not None else None,
        })
        return out

    def layer_info(self, slide_id: str, layer: str, class_name: str | None, k: int | None = None) -> dict[str, Any]:
        """The legend of one layer and its top-k and bottom-k tiles with their read-outs."""
        entry = self.entry(slide_id)
        ev = self.evidence(entry)
        cls = self.class_name(ev, class_name)
        name = self.layer_name(layer)
        lay = ev.layer(name, cls)
        top, bottom = ev.ranked(lay, self.cfg.top_k if k is None else max(1, min(k, 64)))
        return {
            **describe_layer(name, lay),
            "top": [ev.readout(i, cls) for i in top],
            "bottom": [ev.readout(i, cls) for i in bottom],
        }

    def tile_at(self, slide_id: str, x: str, y: str, class_name: str | None) -> dict[str, Any] | None:
        entry = self.entry(slide_id)
        ev = self.evidence(entry)
        try:
            px, py = float(x), float(y)
        except ValueError:
            raise InputError("x and y must be numbers (level-0 pixels)") from None
        if not (math.isfinite(px) and math.isfinite(py)):
            raise InputError("x and y must be finite numbers")
        i = ev.tile_at(px, py)
        return None if i is None else ev.readout(i, self.class_name(ev, class_name))

    def _has_tissue(self, entry: SlideEntry) -> bool:
        return entry.tissue_path is not None or (
            entry.scores_path is not None and entry.scores_path.name == "heatmap.h5"
        )

    def polygons(self, slide_id: str, which: str) -> dict[str, Any]:
        """Tissue contours or ground-truth annotations of a slide, in level-0 pixels."""
        entry = self.entry(slide_id)
        if which == "annotations":
            if entry.annotation_path is None:
                raise NotServedError("no annotations for this slide")
            return {"polygons": _polygons_json(read_polygons(entry.annotation_path))}
        if which != "tissue":
            raise NotServedError("unknown overlay")
        if entry.tissue_path is not None:
            return {"polygons": _polygons_json(read_polygons(entry.tissue_path))}
        if entry.scores_path is not None and entry.scores_path.name == "heatmap.h5":
            return {"polygons": _mask_polygons(entry)}
        raise NotServedError("no tissue contour for this slide")


def _polygons_json(polygons: list[tuple[list[np.ndarray], dict[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for rings, props in polygons:
        cls = props.get("classification") if isinstance(props.get("classification"), dict) else {}
        colour = cls.get("color") if isinstance(cls, dict) else None
        out.append({
            "rings": [np.round(r, 1).tolist() for r in rings],
            "name": str(props.get("name", "")),
            "class": str(cls.get("name", "")) if isinstance(cls, dict) else "",
            "color": [int(c) for c in colour][:3] if isinstance(colour, list) and len(colour) >= 3 else None,
        })
    return out


def _mask_polygons(entry: SlideEntry) -> list[dict[str, Any]]:
    """Outlines of the tissue mask stored in ``heatmap.h5``, scaled to level-0 pixels."""
    assert entry.scores_path is not None
    arrays = read_heatmap_h5(entry.scores_path)
    if arrays.tissue is None:
        return []
    sx = float(arrays.attrs.get("downsample_x") or arrays.attrs.get("downsample") or 1.0)
    sy = float(arrays.attrs.get("downsample_y") or arrays.attrs.get("downsample") or 1.0)
    contours, _ = cv2.findContours(arrays.tissue.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [
        {"rings": [[[round((float(x) + 0.5) * sx, 1), round((float(y) + 0.5) * sy, 1)] for x, y in c.reshape(-1, 2)]],
         "name": f"tissue {n}", "class": "tissue", "color": None}
        for n, c in enumerate(contours, start=1) if len(c) >= 3
    ]

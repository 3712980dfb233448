"""Per-slide preparation shared by the ``tiles`` and ``extract`` runs.

Open a slide with the run's reader, budgets and mpp overrides (:class:`SlideOpener`), find tissue, lay
the tile grid and write the QC thumbnail and tissue GeoJSON (:func:`prepare_slide`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_mil.config import SlideConfig, TilingConfig, TissueConfig
from wsi_mil.errors import NoTissueError
from wsi_mil.slide import Slide, SlideLimits, load_mpp_overrides, open_slide


class SlideOpener:
    """Opens slides with one run's backend, budgets and mpp overrides."""

    def __init__(self, cfg: SlideConfig) -> None:
        self.cfg = cfg
        self.overrides = load_mpp_overrides(cfg.mpp_override_csv) if cfg.mpp_override_csv else {}
        self.limits = SlideLimits(max_slide_px=cfg.max_slide_px, max_read_px=cfg.max_read_px)

    def mpp_for(self, slide_id: str) -> float | None:
        return self.overrides.get(slide_id, self.cfg.mpp_override)

    def open(self, path: Path) -> Slide:
        return open_slide(path, backend=self.cfg.backend, mpp=self.mpp_for(path.stem), limits=self.limits)


@dataclass
class PreparedSlide:
    tissue: Any  # tissue.TissueResult
    grid: Any  # tiling.TileGrid
    seconds: float
    #: level-0 (x, y, w, h) of corrupt file tiles skipped in the segmentation and QC reads (R4, opt-in)
    skipped_tiles: tuple[tuple[int, int, int, int], ...] = ()


def prepare_slide(
    slide: Slide,
    tissue_cfg: TissueConfig,
    tiling_cfg: TilingConfig,
    qc_dir: Path | None = None,
    thumbnail_px: int = 1024,
    *,
    skip_unreadable: bool = False,
) -> PreparedSlide:
    """Tissue detection and the tile grid; writes ``qc_dir/<id>.png`` and ``.geojson`` when given.

    Raises :class:`NoTissueError` when no tissue, or no tile with enough tissue, is found. A corrupt
    file tile met by the whole-level reads fails the slide with a :class:`SlideReadError` naming its
    level-0 location; with ``skip_unreadable`` it reads as glass (white) and is listed in
    ``skipped_tiles`` (R4).
    """
    from wsi_mil.tiling import TileParams, tile_grid
    from wsi_mil.tissue import TissueParams, detect_tissue

    t0 = time.perf_counter()
    slide.skip_unreadable = skip_unreadable
    tissue = detect_tissue(slide, TissueParams(**tissue_cfg.model_dump()))
    if qc_dir is not None:
        qc_dir.mkdir(parents=True, exist_ok=True)
        tissue.save_geojson(qc_dir / f"{slide.slide_id}.geojson")
        tissue.save_qc_png(qc_dir / f"{slide.slide_id}.png", slide, max_side_px=thumbnail_px)
    if tissue.is_empty:
        raise NoTissueError(
            f"{slide.slide_id}: no tissue found (saturation never rises above the floor). Check the QC "
            "thumbnail; for very faint stains lower tissue.min_saturation."
        )
    grid = tile_grid(slide, tissue, TileParams(**tiling_cfg.model_dump()))
    if len(grid.coords) == 0:
        raise NoTissueError(
            f"{slide.slide_id}: tissue found ({tissue.tissue_area_um2 / 1e6:.3f} mm²) but no "
            f"{tiling_cfg.tile_px} px tile at {tiling_cfg.mpp} µm/px is at least "
            f"{tiling_cfg.min_tissue_fraction:.0%} tissue. Lower tiling.min_tissue_fraction or tile size."
        )
    return PreparedSlide(
        tissue=tissue, grid=grid, seconds=time.perf_counter() - t0, skipped_tiles=tuple(slide.skipped_tiles)
    )

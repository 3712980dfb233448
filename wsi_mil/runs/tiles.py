"""Per-slide preparation shared by ``tiles`` and ``extract``: open, find tissue, lay the tile grid, QC.

``run_tiles`` is the library function behind ``wsi-mil tiles``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_mil.config import SlideConfig, TilesConfig, TilingConfig, TissueConfig, config_hash, write_config
from wsi_mil.errors import NoTissueError
from wsi_mil.runs.slide_loop import BatchSummary, run_batch
from wsi_mil.slide import Slide, SlideLimits, load_mpp_overrides, open_slide
from wsi_mil.store import ensure_writable_dir

logger = logging.getLogger(__name__)

TILES_COLUMNS = ("slide_id", "path", "status", "error_class", "error", "n_tiles", "slide_mpp", "mpp", "footprint_px", "seconds")


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


def run_tiles(
    slides: list[Path], out_dir: Path, cfg: TilesConfig | None = None, progress: bool | None = None
) -> BatchSummary:
    """``wsi-mil tiles``: per slide ``coords/<id>.h5``, ``tissue/<id>.png|.geojson``, ``manifest.csv``."""
    from wsi_mil.tiling import read_coords_h5, write_coords_h5

    cfg = cfg or TilesConfig()
    out_dir = ensure_writable_dir(out_dir)
    opener = SlideOpener(cfg.slide)
    write_config(cfg, out_dir / "config.yaml")
    chash = config_hash(cfg)

    def is_done(path: Path) -> bool:
        p = out_dir / "coords" / f"{path.stem}.h5"
        try:
            attrs = read_coords_h5(p).attrs
        except Exception:
            return False
        return bool(attrs.get("complete")) and attrs.get("config_hash") == chash

    def process(path: Path) -> dict[str, Any]:
        with opener.open(path) as slide:
            prepared = prepare_slide(slide, cfg.tissue, cfg.tiling, out_dir / "tissue", cfg.thumbnail_px)
            grid = prepared.grid
            write_coords_h5(
                out_dir / "coords" / f"{slide.slide_id}.h5",
                grid,
                slide.slide_id,
                extra_attrs={"config_hash": chash, "source_file": path.name, "backend": slide.backend_name},
            )
            return {
                "status": "done",
                "n_tiles": len(grid.coords),
                "slide_mpp": slide.mpp,
                "mpp": grid.mpp,
                "footprint_px": grid.footprint_px,
            }

    return run_batch(slides, out_dir, process, TILES_COLUMNS, is_done=is_done, progress=progress, desc="tiling")

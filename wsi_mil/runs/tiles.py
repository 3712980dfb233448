"""``wsi-mil tiles``: tissue and a tile grid per slide, without features (:func:`run_tiles`).

Outputs: ``coords/<id>.h5`` (:mod:`wsi_mil.store.coords_file`), ``tissue/<id>.png|.geojson``, ``manifest.csv``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from wsi_mil.config import TilesConfig, config_hash, write_config
from wsi_mil.runs.prepare import SlideOpener, prepare_slide
from wsi_mil.runs.slide_loop import BatchSummary, run_batch
from wsi_mil.store import ensure_writable_dir

logger = logging.getLogger(__name__)

TILES_COLUMNS = ("slide_id", "path", "status", "error_class", "error", "n_tiles", "slide_mpp", "mpp", "footprint_px", "seconds")


def run_tiles(
    slides: list[Path], out_dir: Path, cfg: TilesConfig | None = None, progress: bool | None = None
) -> BatchSummary:
    """``wsi-mil tiles``: per slide ``coords/<id>.h5``, ``tissue/<id>.png|.geojson``, ``manifest.csv``."""
    from wsi_mil.store.coords_file import read_coords_h5, write_coords_h5

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

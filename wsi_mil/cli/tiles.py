"""``wsi-mil tiles``: a thin command over :func:`wsi_mil.runs.tiles.run_tiles`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from wsi_mil.cli.common import (
    config_option,
    exit_on_error,
    out_option,
    slide_options,
    slide_overrides,
    slides_argument,
    tile_size_options,
)


@click.command("tiles")
@slides_argument
@out_option()
@config_option("tiles")
@tile_size_options
@click.option("--stride-px", type=int, default=None, help="Grid stride in pixels at --mpp (default: tile side).")
@click.option("--min-tissue", type=float, default=None, help="Minimum tissue fraction per tile (default 0.5).")
@slide_options()
def tiles(
    slides: tuple[str, ...],
    out_dir: str,
    config_path: str | None,
    mpp: float | None,
    tile_px: int | None,
    stride_px: int | None,
    min_tissue: float | None,
    backend: str | None,
    mpp_override: float | None,
    mpp_override_csv: str | None,
) -> None:
    """Find tissue and lay a tile grid at an exact µm/px: coords HDF5, QC thumbnails, GeoJSON, manifest.

    SLIDES: folders, globs, files, or a CSV with a 'path' column.
    """
    from wsi_mil.config import TilesConfig, load_config
    from wsi_mil.runs.slide_loop import discover_slides
    from wsi_mil.runs.tiles import run_tiles

    with exit_on_error():
        cfg = load_config(
            TilesConfig,
            config_path,
            {
                "tiling.mpp": mpp,
                "tiling.tile_px": tile_px,
                "tiling.stride_px": stride_px,
                "tiling.min_tissue_fraction": min_tissue,
                **slide_overrides(backend, mpp_override, mpp_override_csv),
            },
        )
        paths = discover_slides(list(slides))
        summary = run_tiles(paths, Path(out_dir), cfg)
    click.echo(summary.text())
    click.echo(f"manifest: {Path(out_dir) / 'manifest.csv'}")
    sys.exit(summary.exit_code)

"""Heatmaps over slide thumbnails, top tiles, QuPath GeoJSON and a review page (``wsi-mil heatmap``).

Light on import: matplotlib, h5py and the slide readers load only when a function needs them.

* :func:`wsi_mil.heatmap.run.run_heatmap` - the batch function behind the command;
* :mod:`wsi_mil.heatmap.render` - canvas, colours, figure;
* :mod:`wsi_mil.heatmap.export` - top/bottom tiles, GeoJSON, HDF5;
* :mod:`wsi_mil.heatmap.review` - ``index.html``;
* :mod:`wsi_mil.heatmap.scores` - the score files of ``wsi-mil predict``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import HeatmapConfig
    from .run import HeatmapRun, run_heatmap

__all__ = ["HeatmapConfig", "HeatmapRun", "run_heatmap"]


def __getattr__(name: str) -> Any:
    if name == "HeatmapConfig":
        from .config import HeatmapConfig

        return HeatmapConfig
    if name in ("run_heatmap", "HeatmapRun"):
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

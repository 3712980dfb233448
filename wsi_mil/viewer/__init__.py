"""``wsi-mil view``: a local, zoomable slide viewer with the model's evidence on top.

:mod:`~wsi_mil.viewer.catalog` finds what a run holds (slides, scores, failures, side files);
:mod:`~wsi_mil.viewer.evidence` colours the tile grid; :mod:`~wsi_mil.viewer.cache` shares slide handles
between request threads; :mod:`~wsi_mil.viewer.service` answers requests without the web;
:mod:`~wsi_mil.viewer.app` is the Starlette application, :mod:`~wsi_mil.viewer.server` serves it with
uvicorn. The browser side is OpenSeadragon (installed from npm, :mod:`~wsi_mil.viewer.assets`) and the
scripts in ``static/``. Deep-zoom tiles come from :mod:`wsi_mil.slide.deepzoom`.
"""

from __future__ import annotations

from wsi_mil.viewer.catalog import Catalog, SlideEntry
from wsi_mil.viewer.server import ViewerServer, is_loopback
from wsi_mil.viewer.service import ViewerService

__all__ = ["Catalog", "SlideEntry", "ViewerServer", "ViewerService", "is_loopback"]

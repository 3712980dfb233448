"""Where the viewer's browser assets are: its own scripts (package data) and OpenSeadragon (from npm).

OpenSeadragon is installed from the npm registry by the set-up (``make setup`` runs ``npm ci`` with the
repository's ``package-lock.json``) and by the Docker build; nothing is fetched at run time. The viewer
takes it from ``$WSI_MIL_OPENSEADRAGON`` (a folder holding ``openseadragon.min.js``), else from
``node_modules/openseadragon/build/openseadragon`` of the repository wsi-mil runs from.
"""

from __future__ import annotations

import os
from pathlib import Path

from wsi_mil.errors import InputError

__all__ = ["OSD_ENV", "STATIC_DIR", "openseadragon_dir"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
OSD_ENV = "WSI_MIL_OPENSEADRAGON"
_REPO = Path(__file__).resolve().parents[2]
_NPM_BUILD = Path("node_modules") / "openseadragon" / "build" / "openseadragon"


def openseadragon_dir() -> Path:
    """The folder with ``openseadragon.min.js`` and its ``images/``; :class:`InputError` saying how to install it."""
    candidates = [Path(os.environ[OSD_ENV])] if os.environ.get(OSD_ENV) else []
    candidates += [_REPO / _NPM_BUILD, Path.cwd() / _NPM_BUILD]
    for folder in candidates:
        if (folder / "openseadragon.min.js").is_file():
            return folder.resolve()
    raise InputError(
        "OpenSeadragon (the viewer's zoomable image component) is not installed: run `make setup` (it runs "
        f"`npm ci` in the repository), or `npm ci` there yourself, or set ${OSD_ENV} to a folder holding "
        f"openseadragon.min.js (looked in: {', '.join(str(c) for c in candidates)})."
    )

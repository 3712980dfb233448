"""The ``wsi-mil`` command line: the click group ``main`` and thin commands over the library.

Importing it is light (no torch, timm, h5py or OpenSlide); the library never imports it.
"""

from __future__ import annotations

from wsi_mil.cli.common import encoder_from_env
from wsi_mil.cli.main import main

__all__ = ["encoder_from_env", "main"]

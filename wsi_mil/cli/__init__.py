"""The ``wsi-mil`` command line: thin commands over the library (heavy imports happen inside commands)."""

from __future__ import annotations

from wsi_mil.cli.main import encoder_from_env, main

__all__ = ["encoder_from_env", "main"]

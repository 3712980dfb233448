"""Feature extraction: the encoder presets (``presets``), building them (``architectures``, ``encoders``),
their weights (``weights``, ``hub``), tile settings and preprocessing (``tile_settings``, ``transforms``),
the tile stream (``stream``), the tile-reading processes of a run (``reader_pool``) and the device, precision and thread policy (``runtime``). The extraction
run itself is :mod:`wsi_mil.runs.extract`.

Importing this package is cheap: torch and timm load on first use of an attribute below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wsi_mil.features.encoders import (
        Encoder,
        create_encoder,
        encoder_identity,
        list_encoders,
        load_efficientnet_lite0,
    )
    from wsi_mil.features.presets import EncoderPreset, get_preset, list_presets
    from wsi_mil.features.runtime import autocast_context, resolve_device, resolve_precision
    from wsi_mil.features.transforms import TileTransform

_LAZY = {
    "Encoder": "wsi_mil.features.encoders",
    "EncoderPreset": "wsi_mil.features.presets",
    "get_preset": "wsi_mil.features.presets",
    "list_presets": "wsi_mil.features.presets",
    "TileTransform": "wsi_mil.features.transforms",
    "autocast_context": "wsi_mil.features.runtime",
    "create_encoder": "wsi_mil.features.encoders",
    "encoder_identity": "wsi_mil.features.encoders",
    "list_encoders": "wsi_mil.features.encoders",
    "load_efficientnet_lite0": "wsi_mil.features.encoders",
    "resolve_device": "wsi_mil.features.runtime",
    "resolve_precision": "wsi_mil.features.runtime",
}

__all__ = [
    "Encoder",
    "EncoderPreset",
    "TileTransform",
    "autocast_context",
    "create_encoder",
    "encoder_identity",
    "get_preset",
    "list_encoders",
    "list_presets",
    "load_efficientnet_lite0",
    "resolve_device",
    "resolve_precision",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

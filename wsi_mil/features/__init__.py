"""Feature extraction: frozen tile encoders (``encoders``), weight resolution (``weights``).

Importing this package is cheap: torch and timm load on first use of an attribute below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wsi_mil.features.encoders import (
        Encoder,
        EncoderSpec,
        TileTransform,
        autocast_context,
        create_encoder,
        encoder_identity,
        list_encoders,
        load_efficientnet_lite0,
        resolve_device,
    )

_LAZY = {
    "Encoder": "wsi_mil.features.encoders",
    "EncoderSpec": "wsi_mil.features.encoders",
    "TileTransform": "wsi_mil.features.encoders",
    "autocast_context": "wsi_mil.features.encoders",
    "create_encoder": "wsi_mil.features.encoders",
    "encoder_identity": "wsi_mil.features.encoders",
    "list_encoders": "wsi_mil.features.encoders",
    "load_efficientnet_lite0": "wsi_mil.features.encoders",
    "resolve_device": "wsi_mil.features.encoders",
}

__all__ = [
    "Encoder",
    "EncoderSpec",
    "TileTransform",
    "autocast_context",
    "create_encoder",
    "encoder_identity",
    "list_encoders",
    "load_efficientnet_lite0",
    "resolve_device",
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

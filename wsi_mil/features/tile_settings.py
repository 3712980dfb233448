"""The tile grid and preprocessing an extraction runs with: the encoder preset's, unless the user says otherwise.

A preset states the tile µm/px and side it expects and its preprocessing
(:class:`~wsi_mil.features.presets.EncoderPreset`). :func:`resolve_tile_settings` takes the user's
values where given (``None``: not given) and the preset's otherwise, and returns one warning per user
value that contradicts the preset, naming both (a 0.5 µm/px model fed 1.0 µm/px tiles still runs, but
its features are not what the model card describes). Encoders that are not presets keep the defaults
from before presets existed: 0.5 µm/px, 256 px, timm's preprocessing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from wsi_mil.features.presets import EncoderPreset, Preprocessing, get_preset, is_preset

__all__ = ["DEFAULT_TILE_MPP", "DEFAULT_TILE_PX", "TileSettings", "merge_preprocessing", "resolve_tile_settings"]

DEFAULT_TILE_MPP = 0.5
DEFAULT_TILE_PX = 256


@dataclass(frozen=True)
class TileSettings:
    """Tile µm/px and side for the grid, and warnings for user values that contradict the preset."""

    mpp: float
    tile_px: int
    preset: EncoderPreset | None
    warnings: list[str] = field(default_factory=list)


def resolve_tile_settings(encoder: str, mpp: float | None, tile_px: int | None) -> TileSettings:
    """The grid for ``encoder``: the user's ``mpp``/``tile_px`` where given, else the preset's."""
    if not is_preset(encoder):
        return TileSettings(mpp if mpp is not None else DEFAULT_TILE_MPP, tile_px or DEFAULT_TILE_PX, None)
    preset = get_preset(encoder)
    warnings = []
    if mpp is not None and not math.isclose(mpp, preset.tile_mpp, rel_tol=0.02):
        warnings.append(
            f"tile µm/px {mpp:g} overrides the {preset.name} preset's {preset.tile_mpp:g} µm/px: the encoder "
            f"was trained at {preset.tile_mpp:g} µm/px, so its features at {mpp:g} µm/px may be worse"
        )
    if tile_px is not None and tile_px != preset.tile_px:
        pre = preset.preprocessing
        warnings.append(
            f"tile side {tile_px} px overrides the {preset.name} preset's {preset.tile_px} px: each tile is "
            f"resized to {pre.resize_px} px" + (f" and centre-cropped to {pre.input_px} px" if pre.resize_px != pre.input_px else "")
            + " for the model, so it sees another field of view than it was trained on"
        )
    return TileSettings(
        mpp if mpp is not None else preset.tile_mpp, tile_px if tile_px is not None else preset.tile_px, preset, warnings
    )


def merge_preprocessing(
    base: Preprocessing, overrides: Mapping[str, Any], owner: str
) -> tuple[Preprocessing, list[str]]:
    """``base`` with the non-``None`` ``overrides`` applied, and one warning per changed value naming both."""
    changes = {k: (tuple(v) if isinstance(v, list | tuple) else v) for k, v in overrides.items() if v is not None}
    unknown = set(changes) - {"input_px", "resize_px", "interpolation", "mean", "std"}
    if unknown:
        raise KeyError(f"unknown preprocessing keys {sorted(unknown)}")
    if "input_px" in changes and "resize_px" not in changes and base.resize_px == base.input_px:
        changes["resize_px"] = changes["input_px"]  # "resize to N" stays a plain resize
    merged = replace(base, **changes)  # type: ignore[arg-type]  # values validated by the config
    warnings = [
        f"preprocessing {key} {getattr(merged, key)!r} overrides {owner}'s {getattr(base, key)!r}"
        for key in ("input_px", "resize_px", "interpolation", "mean", "std")
        if getattr(merged, key) != getattr(base, key)
    ]
    return merged, warnings

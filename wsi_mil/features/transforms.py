"""Tile preprocessing: uint8 RGB tiles -> the normalised float batch a model takes, on its device.

:func:`model_preprocessing` reads what a timm model expects (input size, interpolation, mean, std) and
:func:`preset_preprocessing` what an encoder preset says (resize, centre crop, mean, std);
:class:`TileTransform` applies either to whole batches with torch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_mil.errors import ConfigError
from wsi_mil.features.timm_import import import_timm

logger = logging.getLogger(__name__)

_TORCH_INTERPOLATION = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}


class TileTransform:
    """Batched, torch-native tile preprocessing: uint8 RGB tiles -> normalised float32 ``[B, 3, h, w]``.

    Accepts a uint8 numpy array or tensor ``[H, W, 3]`` or ``[B, H, W, 3]`` (a 4th alpha channel is
    dropped) or a sequence of ``[H, W, 3]`` arrays. The uint8 batch is moved to ``device`` first (4x less
    to copy than floats; non-blocking from pinned memory), then, on that device: resized as a whole to
    ``resize_size`` (default: ``input_size``; antialiased bilinear/bicubic, on uint8 on the CPU, where
    torch rounds as PIL does, in float elsewhere; skipped when the tile already has that size),
    centre-cropped to ``input_size`` (as torchvision's ``CenterCrop``), scaled to [0, 1] and normalised
    with mean/std. The output is a new float32 tensor in ``memory_format`` (channels_last for CNNs run
    that way); the input is never modified.
    """

    def __init__(
        self,
        input_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bilinear",
        memory_format: torch.memory_format = torch.contiguous_format,
        resize_size: tuple[int, int] | None = None,
    ) -> None:
        if len(mean) != 3 or len(std) != 3:
            raise ConfigError(f"mean and std need 3 values each, got {mean!r} and {std!r}")
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.resize_size = self.input_size if resize_size is None else (int(resize_size[0]), int(resize_size[1]))
        if self.resize_size[0] < self.input_size[0] or self.resize_size[1] < self.input_size[1]:
            raise ConfigError(f"cannot crop {self.input_size} out of tiles resized to {self.resize_size}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.interpolation = interpolation
        mode = _TORCH_INTERPOLATION.get(interpolation)
        if mode is None:
            logger.warning("Interpolation %r is not available in torch; using bicubic.", interpolation)
            mode = "bicubic"
        self.mode = mode
        self.memory_format = memory_format
        self._affine: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return (
            f"TileTransform(input_size={self.input_size}, resize_size={self.resize_size}, "
            f"interpolation={self.interpolation!r}, mean={self.mean}, std={self.std})"
        )

    def _scale_shift(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._affine:
            mean = torch.tensor(self.mean, dtype=torch.float32)
            std = torch.tensor(self.std, dtype=torch.float32)
            scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1)
            shift = (mean / std).view(1, 3, 1, 1)
            self._affine[device] = (scale.to(device), shift.to(device))
        return self._affine[device]

    @staticmethod
    def as_uint8_batch(tiles: np.ndarray | torch.Tensor | Sequence[np.ndarray]) -> torch.Tensor:
        """Tiles as a uint8 tensor ``[B, H, W, 3]`` (no copy for a uint8 array or tensor)."""
        if isinstance(tiles, (list, tuple)):
            tiles = np.stack([np.asarray(t) for t in tiles])
        t = torch.from_numpy(np.ascontiguousarray(tiles)) if isinstance(tiles, np.ndarray) else tiles
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tiles must be a numpy array or a torch tensor, not {type(tiles).__name__}")
        if t.dtype != torch.uint8:
            raise TypeError(f"tiles must be uint8 RGB (0-255), got dtype {t.dtype}")
        if t.ndim == 3:
            t = t.unsqueeze(0)
        if t.ndim != 4 or t.shape[-1] not in (3, 4):
            raise ValueError(
                f"tiles must be [H, W, 3] or [B, H, W, 3] (RGB last), got shape {tuple(t.shape)}"
            )
        if t.shape[-1] == 4:
            t = t[..., :3]
        return t

    def __call__(
        self,
        tiles: np.ndarray | torch.Tensor | Sequence[np.ndarray],
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        t = self.as_uint8_batch(tiles)
        dev = torch.device(device) if device is not None else t.device
        if t.device != dev:
            t = t.to(dev, non_blocking=dev.type == "cuda" and t.is_pinned())
        x = t.permute(0, 3, 1, 2)  # [B, 3, H, W] view with channels_last strides, no copy
        if tuple(x.shape[-2:]) != self.resize_size:
            # On the CPU, torch resizes uint8 channels_last directly (fast AVX path; rounds to uint8 as
            # PIL does); on other devices resize in float and clip bicubic overshoot to [0, 255].
            x = x if dev.type == "cpu" else x.to(torch.float32)
            if self.mode == "nearest":
                x = nn.functional.interpolate(x, size=self.resize_size, mode="nearest")
            else:
                x = nn.functional.interpolate(
                    x, size=self.resize_size, mode=self.mode, align_corners=False, antialias=True
                )
                if x.is_floating_point() and self.mode == "bicubic":
                    x = x.clamp_(0.0, 255.0)
        if tuple(x.shape[-2:]) != self.input_size:
            h, w = x.shape[-2:]
            if h < self.input_size[0] or w < self.input_size[1]:
                raise ValueError(f"tiles of {h}x{w} px are smaller than the {self.input_size} crop")
            top = int(round((h - self.input_size[0]) / 2.0))  # torchvision CenterCrop's offsets
            left = int(round((w - self.input_size[1]) / 2.0))
            x = x[..., top : top + self.input_size[0], left : left + self.input_size[1]]
        # one conversion pass into the requested layout, then (x / 255 - mean) / std in place
        x = x.to(torch.float32, memory_format=self.memory_format, copy=True)
        scale, shift = self._scale_shift(dev)
        return x.mul_(scale).sub_(shift)


def model_preprocessing(model: nn.Module) -> dict[str, Any]:
    """The preprocessing timm configures for ``model``, as feature files record it (input size,
    interpolation, mean, std; tiles are resized whole, never cropped)."""
    import_timm()  # first: timm without torch._dynamo (timm_import)
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    return {
        "input_size": [int(v) for v in cfg["input_size"]],
        "interpolation": str(cfg["interpolation"]),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "crop_pct": float(cfg.get("crop_pct", 1.0)),
        "crop_mode": str(cfg.get("crop_mode", "center")),
        "resize": "whole tile to input_size, no crop",
    }


def preset_preprocessing(pre: Any) -> dict[str, Any]:
    """What feature files record about a preset's preprocessing (a :class:`~wsi_mil.features.presets.Preprocessing`)."""
    crop = "" if pre.resize_px == pre.input_px else f", centre crop {pre.input_px} px"
    return {
        "input_size": [3, int(pre.input_px), int(pre.input_px)],
        "resize_px": int(pre.resize_px),
        "interpolation": str(pre.interpolation),
        "mean": [float(v) for v in pre.mean],
        "std": [float(v) for v in pre.std],
        "crop_pct": float(pre.input_px) / float(pre.resize_px),
        "crop_mode": "center",
        "resize": f"whole tile to {pre.resize_px} px{crop}",
    }


def preset_transform(pre: Any) -> TileTransform:
    """The :class:`TileTransform` of a preset's :class:`~wsi_mil.features.presets.Preprocessing`."""
    return TileTransform(
        input_size=(pre.input_px, pre.input_px),
        mean=pre.mean,
        std=pre.std,
        interpolation=pre.interpolation,
        resize_size=(pre.resize_px, pre.resize_px),
    )

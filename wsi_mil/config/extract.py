"""Configs of ``wsi-mil tiles`` and ``wsi-mil extract`` (defaults: ``configs/tiles.yaml``, ``configs/extract.yaml``)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from wsi_mil.config.base import StrictModel, config_hash
from wsi_mil.errors import ConfigError


class TissueConfig(StrictModel):
    seg_mpp: float = Field(8.0, gt=0.5, le=64.0, description="µm/px at which tissue is segmented")
    min_saturation: int = Field(15, ge=0, le=255, description="floor under the Otsu threshold")
    median_blur_um: float = Field(56.0, ge=0, description="median blur kernel, µm")
    close_um: float = Field(64.0, ge=0, description="morphological close kernel, µm")
    min_tissue_area_um2: float = Field(50_000.0, ge=0, description="smallest piece kept (0.05 mm²)")
    min_hole_area_um2: float = Field(10_000.0, ge=0, description="smallest hole kept")


class TilingConfig(StrictModel):
    mpp: float = Field(0.5, gt=0.05, le=16.0, description="tile resolution, µm/px")
    tile_px: int = Field(256, ge=16, le=4096)
    stride_px: int | None = Field(None, ge=1, le=4096, description="default: tile_px (no overlap)")
    min_tissue_fraction: float = Field(0.5, ge=0.0, le=1.0)


class ExtractTilingConfig(StrictModel):
    """The tile grid of ``wsi-mil extract``: ``null`` takes the encoder preset's value."""

    mpp: float | None = Field(
        None, gt=0.05, le=16.0, description="tile resolution, µm/px; null: the encoder preset's (0.5 for other timm ids)"
    )
    tile_px: int | None = Field(None, ge=16, le=4096, description="null: the encoder preset's (256 for other timm ids)")
    stride_px: int | None = Field(None, ge=1, le=4096, description="default: tile_px (no overlap)")
    min_tissue_fraction: float = Field(0.5, ge=0.0, le=1.0)


class PreprocessingConfig(StrictModel):
    """Overrides of the encoder preset's preprocessing (``null``: the preset's value; a change is warned)."""

    input_px: int | None = Field(None, ge=16, le=4096, description="model input side, after the centre crop")
    resize_px: int | None = Field(None, ge=16, le=4096, description="tiles are resized whole to this side first")
    interpolation: Literal["bilinear", "bicubic"] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


class SlideConfig(StrictModel):
    backend: Literal["auto", "openslide", "tiffslide"] = "auto"
    mpp_override: float | None = Field(None, gt=0)
    mpp_override_csv: str | None = None
    max_slide_px: int = Field(100_000_000_000, gt=0)
    max_read_px: int = Field(64 * 1024 * 1024, gt=0)


class TilesConfig(StrictModel):
    """``wsi-mil tiles``."""

    slide: SlideConfig = SlideConfig()
    tissue: TissueConfig = TissueConfig()
    tiling: TilingConfig = TilingConfig()
    thumbnail_px: int = Field(1024, ge=64, le=8192)


class ExtractConfig(StrictModel):
    """``wsi-mil extract``."""

    slide: SlideConfig = SlideConfig()
    tissue: TissueConfig = TissueConfig()
    tiling: ExtractTilingConfig = ExtractTilingConfig()
    encoder: str = "tf_efficientnet_lite0"
    weights: str | None = None
    preprocessing: PreprocessingConfig | None = Field(
        None, description="overrides of the encoder preset's preprocessing; null: the preset's"
    )
    random_init: bool = False
    device: str = "auto"
    devices: list[str] | Literal["all"] | None = Field(
        None,
        description="one extract process per device, each with a disjoint part of the slides: 'all' (every visible "
        "CUDA device) or a list such as [cuda:0, cuda:1] ('cuda:0,cuda:1' too; an entry may repeat: two "
        "processes on one GPU, or cpu,cpu); null: one process on `device`",
    )
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "auto"
    batch_size: int | None = Field(
        None, ge=1, le=4096, description="tiles per forward pass; null: 8 on CPU (fastest measured), 128 on CUDA"
    )
    workers: int = Field(-1, ge=-1, le=64, description="-1: choose from the CPU count")
    channels_last: bool = True
    compile: bool = False
    cpu_fusion: bool = Field(
        True, description="on the CPU, run a CNN encoder's convolutions fused with their batch norm, ReLU and "
        "residual add (oneDNN, weights packed once; features change by rounding only)",
    )
    feature_dtype: Literal["float32", "float16"] = "float32"
    skip_unreadable_tiles: bool = False
    thumbnail_px: int = Field(1024, ge=64, le=8192)

    @field_validator("devices", mode="before")
    @classmethod
    def _split_devices(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip() != "all":
            return [part.strip() for part in value.split(",")]
        return value.strip() if isinstance(value, str) else value

    @field_validator("devices")
    @classmethod
    def _check_devices(cls, value: list[str] | str | None) -> list[str] | str | None:
        if not isinstance(value, list):
            return value
        bad = [d for d in value if not re.fullmatch(r"cpu|cuda:\d+", d)]
        if bad or not value:
            raise ConfigError(
                f"{bad or 'an empty list'} not understood: give 'all' or entries cpu or cuda:N, e.g. "
                "--devices cuda:0,cuda:1."
            )
        if len({d.split(":")[0] for d in value}) > 1:
            raise ConfigError(
                f"devices {value} mix CPU and CUDA: their precision and batch size would differ, and so would "
                "the features. Give only cuda:N entries (or only cpu)."
            )
        return value

    @model_validator(mode="after")
    def _device_or_devices(self) -> ExtractConfig:
        if self.devices is not None and self.device != "auto":
            raise ConfigError(
                f"device {self.device!r} and devices {self.devices!r} both given: keep one (devices runs one "
                "process per entry; device runs one process)."
            )
        return self


# Fields that change what an extract output contains; a rerun with different values is refused. Where it
# ran (device, devices, workers, batch size) is not one of them: features do not depend on the process.
EXTRACT_HASH_FIELDS = ("slide", "tissue", "tiling", "encoder", "weights", "random_init", "precision", "feature_dtype")


def extract_hash_fields(cfg: ExtractConfig) -> tuple[str, ...]:
    """:data:`EXTRACT_HASH_FIELDS`, plus ``preprocessing`` when it overrides the preset (so folders made
    before the key existed keep their hash)."""
    return EXTRACT_HASH_FIELDS + (("preprocessing",) if cfg.preprocessing is not None else ())


def extract_config_hash(cfg: ExtractConfig) -> str:
    """The hash that says whether two extract configs produce the same outputs."""
    return config_hash(cfg, extract_hash_fields(cfg))

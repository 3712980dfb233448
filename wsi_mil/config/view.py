"""``ViewConfig``: the validated settings of ``wsi-mil view`` (unknown keys are rejected).

Defaults equal ``configs/view.yaml``. The server binds to ``127.0.0.1`` unless another host is asked for.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from wsi_mil.config import StrictModel

LayerChoice = Literal["probability", "attention", "rank"]


class ViewConfig(StrictModel):
    """``wsi-mil view``."""

    #: interface the server listens on; anything but a loopback address is logged as a warning
    host: str = Field("127.0.0.1", min_length=1, max_length=253)
    #: 0: any free port
    port: int = Field(8765, ge=0, le=65535)
    backend: Literal["auto", "openslide", "tiffslide"] = "auto"
    #: the layer a slide page opens with: ``probability`` (P(class), fixed 0-1), ``attention`` (n·α, fixed
    #: log2 scale) or ``rank`` (attention rank within the slide)
    layer: LayerChoice = "probability"
    colormap: str = "turbo"
    top_k: int = Field(8, ge=1, le=64, description="tiles in the top and bottom galleries")
    jpeg_quality: int = Field(85, ge=50, le=100)
    #: bounded, thread-safe slide handle cache: slides open at once, handles per slide
    max_open_slides: int = Field(8, ge=1, le=256)
    handles_per_slide: int = Field(4, ge=1, le=64)
    #: encoded tiles kept in memory (MiB; 0: none)
    tile_cache_mb: int = Field(64, ge=0, le=4096)
    #: decoded slide tiles kept by OpenSlide, one cache shared by every open handle (MiB)
    decode_cache_mb: int = Field(64, ge=1, le=4096)
    #: threads that read and encode tiles (more requests wait; each thread also holds its own allocator arena)
    worker_threads: int = Field(8, ge=1, le=128)

    @model_validator(mode="after")
    def _check_colormap(self) -> ViewConfig:
        from matplotlib import colormaps

        if self.colormap not in colormaps:
            raise ValueError(f"unknown colormap {self.colormap!r}; use a matplotlib name such as turbo, viridis, inferno")
        return self

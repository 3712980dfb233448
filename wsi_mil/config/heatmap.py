"""``HeatmapConfig``: the validated settings of ``wsi-mil heatmap`` (unknown keys are rejected).

Defaults equal ``configs/heatmap.yaml``. Sizes are physical (µm) or canvas pixels, never "levels".
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from wsi_mil.config import SlideConfig, StrictModel

ScoreKind = Literal["attention", "probability"]
AttentionScale = Literal["rank", "fixed"]


class ClipTissueConfig(StrictModel):
    """Tissue detection on the heatmap canvas (the canvas sets the resolution; see ``wsi_mil.tissue``)."""

    min_saturation: int = Field(15, ge=0, le=255, description="floor under the Otsu threshold")
    median_blur_um: float = Field(56.0, ge=0, description="median blur kernel, µm")
    close_um: float = Field(64.0, ge=0, description="morphological close kernel, µm")
    min_tissue_area_um2: float = Field(50_000.0, ge=0, description="smallest piece kept (0.05 mm²)")
    min_hole_area_um2: float = Field(10_000.0, ge=0, description="smallest hole kept")


class HeatmapConfig(StrictModel):
    """``wsi-mil heatmap``."""

    slide: SlideConfig = SlideConfig()
    #: Tissue clipping: detection settings, run on the thumbnail at the canvas resolution.
    tissue: ClipTissueConfig = ClipTissueConfig()
    #: Canvas resolution in µm/px; ``None``: the whole slide fits ``max_side_px``.
    canvas_mpp: float | None = Field(None, gt=0.5, le=256.0, description="canvas µm/px (default: from max_side_px)")
    max_side_px: int = Field(2048, ge=128, le=8192, description="longest canvas side when canvas_mpp is not set")
    #: ``probability`` (default): the tile's own class probability softmax(z_t), on the fixed scale 0 to 1,
    #: the same on every slide, so a slide the model finds negative stays cold; ``attention``: the model's α_t.
    score: ScoreKind = "probability"
    #: ``fixed`` (default): log2(n·α) clipped to ±attention_log2_max, 0 = uniform attention, the same scale on
    #: every slide; ``rank``: per-slide rank percentile (0-100), every slide spans the whole colour range.
    attention_scale: AttentionScale = "fixed"
    attention_log2_max: float = Field(4.0, gt=0.0, le=20.0, description="fixed scale: log2(n·α) clipped to ±this")
    #: Class shown with ``score: probability`` (and the class of the ``P(...)`` columns); ``None``: the
    #: second class of a binary model (the positive class), else each slide's predicted class.
    class_name: str | None = None
    clip_to_tissue: bool = True
    #: Gaussian smoothing of the canvas, µm (0: none; tiles keep sharp edges).
    smooth_sigma_um: float = Field(0.0, ge=0.0, le=5000.0)
    colormap: str = "turbo"
    overlay_alpha: float = Field(0.5, gt=0.0, le=1.0, description="opacity of the colours over the tissue")
    top_k: int = Field(8, ge=0, le=256, description="top and bottom tiles exported per slide")
    geojson_object_type: Literal["detection", "tile"] = "detection"
    figure_dpi: int = Field(110, ge=50, le=600)
    write_geojson: bool = True
    #: draw scores over a slide file whose fingerprint differs from the one they were made from (a
    #: re-scanned slide), with a warning; by default such a slide is refused
    ignore_slide_identity: bool = False

    @model_validator(mode="after")
    def _check_colormap(self) -> HeatmapConfig:
        from matplotlib import colormaps

        if self.colormap not in colormaps:
            raise ValueError(f"unknown colormap {self.colormap!r}; use a matplotlib name such as turbo, viridis, inferno")
        return self

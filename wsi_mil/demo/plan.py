"""The plan of the sample cohort: which slides it holds, their labels, cases, µm/px and file formats,
and the lesion knobs (:class:`LesionKnobs`: share of tissue, lesions per slide, kind), checked."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from wsi_mil.demo.pyramid import SlideFormat
from wsi_mil.errors import ConfigError

#: Physical size of a default slide (width, height) in µm, before the per-slide jitter.
DEFAULT_SLIDE_SIZE_UM: tuple[float, float] = (2700.0, 2200.0)

LesionKind = Literal["ihc", "he"]
LESION_KINDS: tuple[LesionKind, ...] = ("ihc", "he")
#: Lesion share of a positive slide's tissue that can be asked for.
LESION_SHARE_RANGE: tuple[float, float] = (0.003, 0.5)
MAX_LESIONS_PER_SLIDE = 8
#: Smallest lesion that can be asked for (a few cells): 20 x 20 µm.
MIN_ASKED_LESION_UM2 = 400.0
#: The lesion knobs under their ``cohort.json`` names, at their defaults.
LESION_PARAM_DEFAULTS: dict[str, Any] = {"lesion_share": None, "lesions_per_slide": None, "lesion_kind": "ihc"}
#: Tissue share of a slide's area at the low end (the default cohort has about 0.31 to 0.44).
_LOW_TISSUE_SHARE = 0.3


@dataclass(frozen=True)
class LesionKnobs:
    """The lesions of positive slides: ``share`` of the tissue (None: drawn per slide in 3.5 to 8.8 %,
    each lesion at least about 250 x 250 µm x ``scale``), lesions ``per_slide`` (None: drawn, 1 to 3)
    and ``kind`` (``"ihc"``: brown IHC tissue; ``"he"``: H&E carcinoma tissue)."""

    share: float | None = None
    per_slide: int | None = None
    kind: LesionKind = "ihc"

    @property
    def is_default(self) -> bool:
        return self == LesionKnobs()

    def params(self) -> dict[str, Any]:
        """The knobs that differ from the defaults, under their ``cohort.json`` names."""
        named = {"lesion_share": self.share, "lesions_per_slide": self.per_slide, "lesion_kind": self.kind}
        return {k: v for k, v in named.items() if v != LESION_PARAM_DEFAULTS[k]}


def lesion_knobs(share: object, per_slide: object, kind: object, scale: float) -> LesionKnobs:
    """Checked lesion knobs; :class:`~wsi_mil.errors.ConfigError` says what is wrong and what is allowed."""
    lo, hi = LESION_SHARE_RANGE
    if share is not None:
        if isinstance(share, bool) or not isinstance(share, int | float) or not lo <= share <= hi:
            raise ConfigError(
                f"lesion_share is the lesion area as a fraction of each positive slide's tissue, "
                f"from {lo} to {hi} (e.g. 0.01 for 1 %); got {share!r}."
            )
        share = float(share)
    if per_slide is not None and (
        isinstance(per_slide, bool)
        or not isinstance(per_slide, int)
        or not 1 <= per_slide <= MAX_LESIONS_PER_SLIDE
    ):
        raise ConfigError(
            f"lesions_per_slide must be a whole number from 1 to {MAX_LESIONS_PER_SLIDE}; got {per_slide!r}."
        )
    if kind not in LESION_KINDS:
        raise ConfigError(f"lesion_kind must be one of {', '.join(LESION_KINDS)}; got {kind!r}.")
    if share is not None:
        # The smallest lesion asked for, on a slide with little tissue (the lesions split the share).
        tissue_um2 = DEFAULT_SLIDE_SIZE_UM[0] * DEFAULT_SLIDE_SIZE_UM[1] * 0.81 * scale**2 * _LOW_TISSUE_SHARE
        per_lesion = share * tissue_um2 / (per_slide or 3)
        if per_lesion < MIN_ASKED_LESION_UM2:
            side = math.sqrt(per_lesion)
            raise ConfigError(
                f"lesions of {share:g} of the tissue split {per_slide or 'up to 3'} ways at scale {scale:g} "
                f"would be as small as {side:.0f} x {side:.0f} µm (at least 20 x 20 µm is needed): "
                "ask for a larger scale, a larger share or fewer lesions per slide."
            )
    return LesionKnobs(share, per_slide, kind)  # type: ignore[arg-type]

#: Level-0 µm/px and file formats cycled over the slides (Aperio GT450 0.2631, AT2 0.499, ...).
SLIDE_MPPS: tuple[float, ...] = (0.25, 0.5, 0.2631, 0.499)
SLIDE_FORMATS: tuple[SlideFormat, ...] = ("svs", "tif")


@dataclass(frozen=True, slots=True)
class SlideSpec:
    """One planned slide: its index in the cohort (seeds its generator), ids, label, µm/px and format."""

    index: int
    slide_id: str
    case_id: str
    label: str
    mpp: float
    fmt: SlideFormat


def plan_slides(n_slides: int, seed: int) -> list[SlideSpec]:
    """Labels (balanced), cases (at least one with two slides of one label), µm/px and formats."""
    rng = np.random.default_rng([seed, 7919])
    n_pos = n_slides // 2
    labels = ["tumor"] * n_pos + ["normal"] * (n_slides - n_pos)
    order = rng.permutation(n_slides)
    labels = [labels[i] for i in order]
    # Pair slides of the same label into two-slide cases: about one pair per six slides.
    n_pairs = max(1, n_slides // 6)
    groups: list[list[int]] = []
    used: set[int] = set()
    for p in range(n_pairs):
        wanted = "tumor" if p % 2 == 0 else "normal"
        for label in (wanted, "normal" if wanted == "tumor" else "tumor"):
            free = [i for i in range(n_slides) if i not in used and labels[i] == label]
            if len(free) >= 2:
                groups.append(free[:2])
                used.update(free[:2])
                break
    groups += [[i] for i in range(n_slides) if i not in used]
    groups.sort(key=lambda g: g[0])
    specs: list[SlideSpec] = []
    for case_no, group in enumerate(groups, start=1):
        case_id = f"case{case_no:03d}"
        for j, i in enumerate(group):
            specs.append(SlideSpec(0, f"{case_id}_{chr(ord('A') + j)}", case_id, labels[i], 0.0, "svs"))
    specs.sort(key=lambda s: s.slide_id)
    out = []
    for k, s in enumerate(specs):
        mpp = SLIDE_MPPS[k % len(SLIDE_MPPS)]
        fmt = SLIDE_FORMATS[(k + k // len(SLIDE_MPPS)) % len(SLIDE_FORMATS)]
        out.append(SlideSpec(k, s.slide_id, s.case_id, s.label, mpp, fmt))
    return out

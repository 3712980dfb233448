"""The plan of the sample cohort: which slides it holds, their labels, cases, µm/px and file formats."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wsi_mil.demo.pyramid import SlideFormat

#: Level-0 µm/px and file formats cycled over the slides (Aperio GT450 0.2631, AT2 0.499, ...).
SLIDE_MPPS: tuple[float, ...] = (0.25, 0.5, 0.2631, 0.499)
SLIDE_FORMATS: tuple[SlideFormat, ...] = ("svs", "tif")


@dataclass(frozen=True)
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

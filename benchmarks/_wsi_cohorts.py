"""Whole-slide cohorts for the ablation: built from real tissue, extracted once, cached as arrays.

A cohort is ``wsi-mil sample-data`` at one lesion share (H&E lesions of another tissue kind by default,
so that colour alone does not give the lesion away), extracted with ``wsi-mil extract``'s defaults, and
read back into one ``.npz``: every tile's features, its level-0 coordinates, the share of its footprint
inside a lesion polygon (the ground truth of localisation) and its mean RGB (the colour-only baseline),
with each slide's label and case. The arrays are keyed by everything that makes them (cohort settings,
extraction config, the code of ``wsi_mil.demo``), so a rerun reuses them and a change rebuilds them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from localization import lesion_fraction  # noqa: E402  (benchmarks/ is not a package)

logger = logging.getLogger(__name__)

#: tiles whose footprint is at least this share lesion count as lesion tiles (micro-lesions of 0.5 %
#: of the tissue are about one tile wide, so a half-tile threshold would leave some slides without one)
LESION_TILE_SHARE = 0.25


@dataclass(frozen=True)
class CohortSpec:
    lesion_share: float
    n_slides: int = 48
    seed: int = 0
    scale: float = 1.0
    lesion_kind: str = "he"
    lesions_per_slide: int = 1

    @property
    def tag(self) -> str:
        return f"share{self.lesion_share:g}_{self.lesion_kind}_n{self.n_slides}_s{self.seed}_x{self.scale:g}"


@dataclass
class CohortData:
    """One extracted cohort as arrays (bag ``i`` is ``features[offsets[i]:offsets[i+1]]``)."""

    slide_ids: list[str]
    cases: list[str]
    labels: np.ndarray  # [n_slides] 0 normal, 1 tumor
    offsets: np.ndarray  # [n_slides + 1]
    features: np.ndarray  # [n_tiles, d] float32
    lesion: np.ndarray  # [n_tiles] float: share of the tile's footprint inside a lesion
    rgb: np.ndarray  # [n_tiles, 3] mean RGB of the tile
    realised_share: np.ndarray  # [n_slides] lesion tiles / tiles (0 on normal slides)

    @property
    def n_bags(self) -> int:
        return len(self.slide_ids)

    def bag(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    @property
    def lesion_tile(self) -> np.ndarray:
        return self.lesion >= LESION_TILE_SHARE


def _code_digest() -> str:
    h = hashlib.sha256()
    for path in sorted((REPO / "wsi_mil" / "demo").glob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _tile_rgb(slide_path: Path, coords: np.ndarray, footprint_px: float) -> np.ndarray:
    """Mean RGB of each tile's footprint, from one downsampled read (about 8 x 8 pixels per tile)."""
    from wsi_mil.slide import open_slide

    if len(coords) == 0:
        return np.zeros((0, 3), np.float32)
    with open_slide(slide_path) as slide:
        downsample = max(1.0, footprint_px / 8.0)
        image = slide.read_downsampled(downsample).astype(np.float64)
        w0, h0 = slide.dimensions
    sy, sx = image.shape[0] / h0, image.shape[1] / w0
    integral = np.zeros((image.shape[0] + 1, image.shape[1] + 1, 3))
    integral[1:, 1:] = image.cumsum(0).cumsum(1)
    x0 = np.clip(np.floor(coords[:, 0] * sx).astype(int), 0, image.shape[1] - 1)
    y0 = np.clip(np.floor(coords[:, 1] * sy).astype(int), 0, image.shape[0] - 1)
    x1 = np.clip(np.ceil((coords[:, 0] + footprint_px) * sx).astype(int), x0 + 1, image.shape[1])
    y1 = np.clip(np.ceil((coords[:, 1] + footprint_px) * sy).astype(int), y0 + 1, image.shape[0])
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return (total / ((y1 - y0) * (x1 - x0))[:, None]).astype(np.float32)


def prepare(spec: CohortSpec, cache: Path, progress: bool = False) -> CohortData:
    """Build, extract and read one cohort (each step reused when its output is there)."""
    from wsi_mil.config import ExtractConfig, extract_config_hash
    from wsi_mil.demo.cohort import build_sample_cohort
    from wsi_mil.runs.extract import run_extract
    from wsi_mil.store.bag_file import load_bag
    from wsi_mil.store.geojson import read_polygons

    extract_cfg = ExtractConfig()
    key = hashlib.sha256(
        # the config hash, not the whole config: keys that cannot change the features (devices, workers) stay out
        json.dumps([asdict(spec), extract_config_hash(extract_cfg), _code_digest()], sort_keys=True).encode()
    ).hexdigest()[:12]
    arrays = cache / f"{spec.tag}_{key}.npz"
    if arrays.is_file():
        with np.load(arrays, allow_pickle=False) as z:
            return CohortData(
                slide_ids=[str(s) for s in z["slide_ids"]], cases=[str(c) for c in z["cases"]], labels=z["labels"],
                offsets=z["offsets"], features=z["features"], lesion=z["lesion"], rgb=z["rgb"],
                realised_share=z["realised_share"],
            )
    cohort_dir = cache / f"cohort_{spec.tag}"
    info = build_sample_cohort(
        cohort_dir, n_slides=spec.n_slides, seed=spec.seed, scale=spec.scale, lesion_share=spec.lesion_share,
        lesions_per_slide=spec.lesions_per_slide, lesion_kind=spec.lesion_kind,
    )
    slides = sorted(info.slides_dir.iterdir())
    extract_dir = cache / f"extract_{spec.tag}_{key}"
    summary = run_extract(slides, extract_dir, extract_cfg, progress=progress)
    done = {r["slide_id"] for r in summary.records if r["status"] in ("done", "skipped")}
    with open(info.labels_csv, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["slide_id"] in done]
    path_of = {p.stem: p for p in slides}
    feats, lesion, rgb, offsets, share = [], [], [], [0], []
    for row in rows:
        sid = row["slide_id"]
        x, coords, attrs = load_bag(extract_dir / "features" / f"{sid}.h5")
        footprint = float(attrs["footprint_px"])
        annotation = info.annotations_dir / f"{sid}.geojson"
        rings = [r[0] for r, _ in read_polygons(annotation)] if annotation.is_file() else []
        frac = lesion_fraction(coords, footprint, rings)
        feats.append(x)
        lesion.append(frac)
        rgb.append(_tile_rgb(path_of[sid], coords, footprint))
        offsets.append(offsets[-1] + len(x))
        share.append(float((frac >= LESION_TILE_SHARE).mean()) if len(frac) else 0.0)
    data = CohortData(
        slide_ids=[r["slide_id"] for r in rows], cases=[r.get("case_id") or r["slide_id"] for r in rows],
        labels=np.asarray([int(r["label"] == "tumor") for r in rows]), offsets=np.asarray(offsets),
        features=np.concatenate(feats).astype(np.float32), lesion=np.concatenate(lesion),
        rgb=np.concatenate(rgb), realised_share=np.asarray(share),
    )
    cache.mkdir(parents=True, exist_ok=True)
    partial = arrays.with_name(f".{arrays.name}.tmp.npz")
    np.savez(
        partial, slide_ids=np.asarray(data.slide_ids), cases=np.asarray(data.cases), labels=data.labels,
        offsets=data.offsets, features=data.features, lesion=data.lesion, rgb=data.rgb,
        realised_share=data.realised_share,
    )
    partial.replace(arrays)
    return data

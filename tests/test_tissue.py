"""Tissue detection on generated slides whose tissue is known exactly."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from wsi_mil.demo.pyramid import write_pyramid
from wsi_mil.errors import ConfigError, NoTissueError, SlideTooLargeError
from wsi_mil.slide import SlideLimits, open_slide
from wsi_mil.tissue import TissueParams, TissueResult, detect_tissue

GLASS_RGB = (242, 242, 244)
EOSIN_RGB = np.array([232, 150, 196], float)
HAEMATOXYLIN_RGB = np.array([120, 72, 165], float)
PALE_PINK_RGB = np.array([241, 213, 229], float)  # saturation ~30/255: faint loose stroma


def irregular_polygon(cx: float, cy: float, r: float, rng: np.random.Generator, n: int = 180) -> np.ndarray:
    """A blob outline: a circle whose radius wobbles with a few random harmonics."""
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    radius = np.ones_like(theta)
    for k in range(2, 7):
        radius += rng.uniform(0.0, 0.18 / k * 2) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    pts = np.stack([cx + r * radius * np.cos(theta), cy + r * radius * np.sin(theta)], axis=1)
    return np.round(pts).astype(np.int32)


def stain(
    mask: np.ndarray, rng: np.random.Generator, base: np.ndarray | None = None, noise: float = 10.0
) -> np.ndarray:
    """H&E-like colours: a smooth eosin/haematoxylin mix with pixel noise, where ``mask``; glass elsewhere."""
    h, w = mask.shape
    img = np.empty((h, w, 3), np.float32)
    img[:] = GLASS_RGB
    img += rng.normal(0, 2.5, (h, w, 1)).astype(np.float32)
    if base is None:
        field = cv2.resize(rng.random((max(2, h // 64), max(2, w // 64))).astype(np.float32), (w, h))
        mix = np.clip(field, 0, 1)[..., None]
        tissue = EOSIN_RGB * (1 - mix) + HAEMATOXYLIN_RGB * mix
    else:
        tissue = np.broadcast_to(base.astype(np.float32), (h, w, 3))
    tissue = tissue + rng.normal(0, noise, (h, w, 3)).astype(np.float32)
    img[mask] = tissue[mask]
    return np.clip(img, 0, 255).astype(np.uint8)


@dataclass
class KnownSlide:
    path: Path
    truth: np.ndarray  # level-0 bool mask of the tissue that should be found
    mpp: float
    regions: dict[str, np.ndarray]  # named level-0 masks of individual pieces


def make_known_slide(path: Path, fmt: str = "svs") -> KnownSlide:
    """8 x 6 mm at 2 µm/px: two large blobs (one with a hole), a needle strip, a small fragment, dust."""
    mpp = 2.0
    w, h = 4000, 3000
    rng = np.random.default_rng(7)

    def new() -> np.ndarray:
        return np.zeros((h, w), np.uint8)

    big = new()
    cv2.fillPoly(big, [irregular_polygon(1250, 1350, 700, rng)], 1)
    hole = new()
    cv2.ellipse(hole, (1250, 1350), (90, 70), 20, 0, 360, 1, -1)  # ~0.079 mm²: a real hole, kept
    big[hole > 0] = 0
    second = new()
    cv2.fillPoly(second, [irregular_polygon(2950, 1000, 450, rng)], 1)
    needle = new()  # 50 x 400 px = 100 x 800 µm = 0.08 mm²
    box = cv2.boxPoints(((2800.0, 2350.0), (400.0, 50.0), 30.0))
    cv2.fillPoly(needle, [np.round(box).astype(np.int32)], 1)
    fragment = new()  # ~0.2 mm²: CLAM's defaults (a_t=100) drop pieces this small
    cv2.fillPoly(fragment, [irregular_polygon(3550, 2500, 125, rng)], 1)
    tiny_hole = new()  # 30 µm radius: under min_hole_area, so it counts as tissue
    cv2.circle(tiny_hole, (2950, 1000), 15, 1, -1)
    dust = new()  # 20 µm radius specks: under min_tissue_area, dropped
    for cx, cy in ((300, 2700), (3800, 300), (2000, 2800)):
        cv2.circle(dust, (cx, cy), 10, 1, -1)

    drawn = (big | second | needle | fragment | dust).astype(bool) & ~tiny_hole.astype(bool)
    img = stain(drawn, rng)
    write_pyramid(path, img, mpp=mpp, fmt=fmt, downsamples=(1, 4, 16))  # type: ignore[arg-type]
    truth = (big | second | needle | fragment).astype(bool)
    regions = {
        "big": big > 0,
        "second": second > 0,
        "needle": needle > 0,
        "fragment": fragment > 0,
        "hole": hole > 0,
    }
    return KnownSlide(path, truth, mpp, regions)


def at_mask(level0: np.ndarray, mask_shape: tuple[int, ...]) -> np.ndarray:
    """A level-0 bool mask resampled to the tissue mask's grid (area average > 0.5)."""
    small = cv2.resize(
        level0.astype(np.float32), (mask_shape[1], mask_shape[0]), interpolation=cv2.INTER_AREA
    )
    return small > 0.5


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.fixture(scope="module")
def known(tmp_path_factory: pytest.TempPathFactory) -> KnownSlide:
    return make_known_slide(tmp_path_factory.mktemp("tissue") / "known.svs")


@pytest.fixture(scope="module")
def known_result(known: KnownSlide) -> TissueResult:
    with open_slide(known.path) as slide:
        return detect_tissue(slide)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_mask_matches_known_tissue(known: KnownSlide, backend: str) -> None:
    with open_slide(known.path, backend=backend) as slide:  # type: ignore[arg-type]
        result = detect_tissue(slide)
    assert result.mask.dtype == bool
    assert result.seg_mpp == pytest.approx(8.0, rel=0.01)
    assert result.downsample == pytest.approx(4.0)
    truth = at_mask(known.truth, result.mask.shape)
    assert iou(result.mask, truth) >= 0.9
    area_um2 = known.truth.sum() * known.mpp**2
    assert result.tissue_area_um2 == pytest.approx(area_um2, rel=0.06)


def test_small_pieces_kept_dust_dropped(known: KnownSlide, known_result: TissueResult) -> None:
    result = known_result
    assert result.n_pieces == 4  # big, second, needle strip, fragment; the three dust specks are gone
    areas_mm2 = sorted(p.area_um2 / 1e6 for p in result.polygons)
    needle_mm2 = known.regions["needle"].sum() * known.mpp**2 / 1e6
    fragment_mm2 = known.regions["fragment"].sum() * known.mpp**2 / 1e6
    assert 0.05 <= needle_mm2 <= 0.1
    assert areas_mm2[0] == pytest.approx(needle_mm2, rel=0.25)
    assert areas_mm2[1] == pytest.approx(fragment_mm2, rel=0.15)
    for name in ("needle", "fragment"):
        truth = at_mask(known.regions[name], result.mask.shape)
        assert (result.mask & truth).sum() / truth.sum() >= 0.85, name
    # Dust is not tissue.
    ds = result.downsample_xy
    for cx, cy in ((300, 2700), (3800, 300), (2000, 2800)):
        assert not result.mask[int(cy / ds[1]), int(cx / ds[0])]


def test_holes_are_inner_rings(known: KnownSlide, known_result: TissueResult) -> None:
    big = known_result.polygons[0]  # sorted by area, largest first
    assert len(big.holes) == 1
    hole_centre = (big.holes[0].min(axis=0) + big.holes[0].max(axis=0)) / 2
    assert hole_centre == pytest.approx([1250, 1350], abs=20)
    # The small hole in the second blob is filled.
    assert sum(len(p.holes) for p in known_result.polygons) == 1


def test_detection_never_reads_level_0_of_a_pyramid(
    known: KnownSlide, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_slide(known.path) as slide:
        levels: list[int] = []
        original = slide._read_rgba

        def spy(location_px: tuple[int, int], level: int, size_px: tuple[int, int]) -> np.ndarray:
            levels.append(level)
            return original(location_px, level, size_px)

        monkeypatch.setattr(slide, "_read_rgba", spy)
        detect_tissue(slide)
    assert levels and 0 not in levels


def test_segmentation_read_over_budget_is_refused_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """R6: a single-level slide whose level 0 is over the read budget is refused, nothing is read."""
    rng = np.random.default_rng(1)
    mask = np.zeros((1024, 1024), bool)
    mask[200:800, 300:700] = True
    flat = write_pyramid(tmp_path / "flat.tif", stain(mask, rng), mpp=0.5, downsamples=(1,))
    pyramid = write_pyramid(tmp_path / "pyr.tif", stain(mask, rng), mpp=0.5, downsamples=(1, 4, 16))
    limits = SlideLimits(max_read_px=200_000)  # the 64x64 mask fits, reading level 0 (1 Mpx) does not

    def forbidden(*args: object) -> np.ndarray:
        raise AssertionError("pixels were read although the read is over budget")

    with open_slide(flat, limits=limits) as slide:
        monkeypatch.setattr(slide, "_read_rgba", forbidden)
        with pytest.raises(SlideTooLargeError, match="budget"):
            detect_tissue(slide)
    with open_slide(pyramid, limits=limits) as slide:  # the pyramid has a level that fits
        result = detect_tissue(slide)
    assert not result.is_empty


def test_max_seg_side_bounds_the_mask(known: KnownSlide) -> None:
    with open_slide(known.path) as slide:
        result = detect_tissue(slide, TissueParams(max_seg_side_px=250))
    assert max(result.mask.shape) <= 250
    assert result.seg_mpp == pytest.approx(32.0, rel=0.01)
    assert result.n_pieces == 4


@pytest.fixture(scope="module")
def pale_slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """Dense H&E next to faint pale-pink tissue, plus green marker ink and a black ink blot on glass."""
    w, h = 2400, 1600
    rng = np.random.default_rng(3)
    dense = np.zeros((h, w), np.uint8)
    cv2.fillPoly(dense, [irregular_polygon(600, 800, 420, rng)], 1)
    pale = np.zeros((h, w), np.uint8)
    cv2.fillPoly(pale, [irregular_polygon(1650, 700, 380, rng)], 1)
    img = stain(dense > 0, rng)
    pale_img = stain(pale > 0, rng, base=PALE_PINK_RGB, noise=4.0)
    img[pale > 0] = pale_img[pale > 0]
    pen = np.zeros((h, w), np.uint8)
    cv2.line(pen, (300, 1450), (2300, 1350), 1, 30)
    img[pen > 0] = np.clip(np.array([40, 150, 90]) + rng.normal(0, 6, (int(pen.sum()), 3)), 0, 255)
    ink = np.zeros((h, w), np.uint8)
    cv2.circle(ink, (2200, 250), 90, 1, -1)
    img[ink > 0] = np.clip(20 + rng.normal(0, 5, (int(ink.sum()), 3)), 0, 255)
    path = write_pyramid(tmp_path_factory.mktemp("pale") / "pale.tif", img, mpp=2.0, downsamples=(1, 4, 16))
    return path, {"dense": dense > 0, "pale": pale > 0, "pen": pen > 0, "ink": ink > 0}


def test_faint_pale_pink_tissue_is_found(pale_slide: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, regions = pale_slide
    with open_slide(path) as slide:
        result = detect_tissue(slide)
    for name in ("dense", "pale"):
        truth = at_mask(regions[name], result.mask.shape)
        assert iou(result.mask & truth, truth) >= 0.9, name
    assert result.n_pieces == 2


def test_marker_ink_is_not_tissue(pale_slide: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, regions = pale_slide
    with open_slide(path) as slide:
        result = detect_tissue(slide)
        for name in ("pen", "ink"):
            truth = at_mask(regions[name], result.mask.shape)
            assert (result.mask & truth).sum() <= 0.02 * truth.sum(), name
        # With the ink filters off, the marker line is found (the filters do the work).
        plain = detect_tissue(slide, TissueParams(pen_hue_range=None, min_value=0))
    pen = at_mask(regions["pen"], plain.mask.shape)
    assert (plain.mask & pen).sum() >= 0.5 * pen.sum()


@pytest.fixture(scope="module")
def blank_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(5)
    img = stain(np.zeros((1200, 1600), bool), rng)  # white glass with noise, JPEG-compressed
    return write_pyramid(tmp_path_factory.mktemp("blank") / "blank.svs", img, mpp=0.5, fmt="svs")


def test_empty_slide_gives_no_tissue(blank_slide: Path, tmp_path: Path) -> None:
    with open_slide(blank_slide) as slide:
        result = detect_tissue(slide)
        assert result.is_empty and result.n_pieces == 0
        assert not result.mask.any()
        assert result.tissue_area_um2 == 0.0
        assert result.threshold >= TissueParams().min_saturation
        assert result.to_geojson() == {"type": "FeatureCollection", "features": []}
        with pytest.raises(NoTissueError, match="no tissue found.*min_saturation"):
            result.require_tissue()
        result.save_qc_png(tmp_path / "blank.png", slide)
    assert cv2.imread(str(tmp_path / "blank.png")) is not None


def test_require_tissue_returns_self(known_result: TissueResult) -> None:
    assert known_result.require_tissue() is known_result


def test_geojson_for_qupath(known: KnownSlide, known_result: TissueResult, tmp_path: Path) -> None:
    gj = known_result.to_geojson()
    assert gj["type"] == "FeatureCollection"
    assert len(gj["features"]) == known_result.n_pieces
    h, w = known.truth.shape
    total = 0.0
    for feature in gj["features"]:
        assert feature["type"] == "Feature"
        assert feature["properties"]["objectType"] == "annotation"
        assert feature["properties"]["classification"]["name"] == "Tissue"
        geometry = feature["geometry"]
        assert geometry["type"] == "Polygon"
        for k, ring in enumerate(geometry["coordinates"]):
            pts = np.asarray(ring, float)
            assert len(pts) >= 4 and (pts[0] == pts[-1]).all()  # closed
            assert (pts[:, 0] >= 0).all() and (pts[:, 0] <= w).all()
            assert (pts[:, 1] >= 0).all() and (pts[:, 1] <= h).all()
            signed = 0.5 * float(np.dot(pts[:-1, 0], pts[1:, 1]) - np.dot(pts[:-1, 1], pts[1:, 0]))
            assert (signed > 0) == (k == 0)  # exterior CCW, holes CW
            total += signed
    # Polygon area in level-0 px^2 (exteriors minus holes) matches the tissue area.
    assert total * known.mpp**2 == pytest.approx(known_result.tissue_area_um2, rel=0.05)
    out = known_result.save_geojson(tmp_path / "known.geojson")
    assert json.loads(out.read_text()) == json.loads(json.dumps(gj, separators=(",", ":")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["known.geojson"]  # no temp file left


def test_qc_image_and_png(known: KnownSlide, known_result: TissueResult, tmp_path: Path) -> None:
    with open_slide(known.path) as slide:
        thumb = slide.get_thumbnail(800)
        qc = known_result.qc_image(thumb)
        assert qc.dtype == np.uint8 and qc.shape[1] == thumb.shape[1] and qc.shape[0] > thumb.shape[0]
        drawn = qc[: thumb.shape[0]]
        # Tissue contours in green and the hole in blue are drawn on the thumbnail.
        assert (np.abs(drawn.astype(int) - (0, 170, 0)).sum(axis=2) < 30).sum() > 100
        assert (np.abs(drawn.astype(int) - (0, 90, 255)).sum(axis=2) < 30).sum() > 10
        assert (qc[thumb.shape[0] :] < 128).any()  # caption text
        path = known_result.save_qc_png(tmp_path / "qc" / "known.png", slide, max_side_px=600)
    png = cv2.imread(str(path))
    assert png is not None and png.shape[1] == 600
    assert sorted(p.name for p in path.parent.iterdir()) == ["known.png"]


def test_params_are_validated_and_match_the_config() -> None:
    with pytest.raises(ConfigError, match="seg_mpp"):
        TissueParams(seg_mpp=0)
    with pytest.raises(ConfigError, match="max_saturation"):
        TissueParams(min_saturation=40, max_saturation=20)
    with pytest.raises(ConfigError, match="min_tissue_area_um2"):
        TissueParams(min_tissue_area_um2=-1)
    from wsi_mil.config import TissueConfig

    params = TissueParams(**TissueConfig().model_dump())
    assert params.seg_mpp == 8.0 and params.min_tissue_area_um2 == 50_000.0
    assert math.isclose(params.min_hole_area_um2, 10_000.0)


def test_physical_units_do_not_depend_on_seg_mpp(known: KnownSlide) -> None:
    with open_slide(known.path) as slide:
        fine = detect_tissue(slide, TissueParams(seg_mpp=4.0))
        coarse = detect_tissue(slide, TissueParams(seg_mpp=16.0))
    assert fine.n_pieces == coarse.n_pieces == 4
    assert fine.tissue_area_um2 == pytest.approx(coarse.tissue_area_um2, rel=0.05)

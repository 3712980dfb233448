"""Tile grids at an exact µm/px on generated slides of several scanner resolutions, and coords HDF5."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from wsi_mil.demo.pyramid import write_pyramid
from wsi_mil.errors import BagFileError, ConfigError, InputError, NoTissueError
from wsi_mil.slide import open_slide
from wsi_mil.store.coords_file import TileGrid, read_coords_h5, write_coords_h5
from wsi_mil.tiling import TileParams, _tissue_fraction, round_half_up, tile_grid
from wsi_mil.tissue import TissueResult, detect_tissue

#: Slide extent and tissue layout in microns, rendered at each scanner resolution.
EXTENT_UM = (1600.0, 1200.0)


@dataclass
class TiledSlide:
    path: Path
    mpp: float
    truth: np.ndarray  # level-0 bool tissue mask


def render_tissue(mpp: float, seed: int = 0, blank: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A disc, a rotated bar and a notched block of H&E-coloured tissue on glass, at ``mpp`` µm/px."""
    w, h = (round(e / mpp) for e in EXTENT_UM)
    mask = np.zeros((h, w), np.uint8)
    if not blank:

        def px(v_um: float) -> int:
            return round(v_um / mpp)

        cv2.circle(mask, (px(420), px(450)), px(300), 1, -1)
        bar = cv2.boxPoints(((1150 / mpp, 350 / mpp), (700 / mpp, 220 / mpp), 25.0))
        cv2.fillPoly(mask, [np.round(bar).astype(np.int32)], 1)
        cv2.rectangle(mask, (px(900), px(700)), (px(1450), px(1080)), 1, -1)
        cv2.rectangle(mask, (px(1100), px(850)), (px(1250), px(1080)), 0, -1)  # a notch
    rng = np.random.default_rng(seed)
    img = np.clip(243 + rng.normal(0, 2.5, (h, w, 1)), 0, 255).astype(np.uint8).repeat(3, axis=2)
    tissue = np.clip(np.array([215, 130, 190]) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    img[mask > 0] = tissue[mask > 0]
    return img, mask > 0


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[float, TiledSlide]:
    folder = tmp_path_factory.mktemp("tiling")
    out = {}
    for mpp, fmt in ((0.25, "svs"), (0.2631, "svs"), (0.5, "tif")):
        img, truth = render_tissue(mpp)
        path = write_pyramid(folder / f"s{mpp}.{fmt}", img, mpp=mpp, fmt=fmt, downsamples=(1, 4, 16))  # type: ignore[arg-type]
        out[mpp] = TiledSlide(path, mpp, truth)
    return out


@pytest.fixture(scope="module")
def tissue(slides: dict[float, TiledSlide]) -> dict[float, TissueResult]:
    out = {}
    for mpp, s in slides.items():
        with open_slide(s.path) as slide:
            out[mpp] = detect_tissue(slide)
    return out


def grid_for(s: TiledSlide, tissue: TissueResult, params: TileParams = TileParams()) -> TileGrid:
    with open_slide(s.path) as slide:
        return tile_grid(slide, tissue, params)


def test_round_half_up() -> None:
    assert round(486.5) == 486  # Python rounds half to even: not what a footprint wants
    assert round_half_up(486.5) == 487
    assert round_half_up(486.49) == 486
    assert round_half_up(512.0) == 512


@pytest.mark.parametrize(("mpp", "footprint_px"), [(0.25, 512), (0.2631, 487), (0.5, 256)])
def test_footprint_follows_the_slide_mpp(
    slides: dict[float, TiledSlide], tissue: dict[float, TissueResult], mpp: float, footprint_px: int
) -> None:
    s = slides[mpp]
    grid = grid_for(s, tissue[mpp])
    assert grid.slide_mpp == pytest.approx(mpp, rel=1e-6)
    assert grid.footprint_px == footprint_px
    assert grid.footprint_px_exact == pytest.approx(256 * 0.5 / mpp, rel=1e-6)
    assert grid.tile_px == 256 and grid.mpp == 0.5 and grid.stride_px == 256
    # No drift: every position is floor(i * exact_stride + 0.5).
    stride = grid.stride_px_l0_exact
    for axis in (0, 1):
        values = np.unique(grid.coords[:, axis])
        i = np.round(values / stride)
        assert (values == np.floor(i * stride + 0.5)).all()
    steps = np.diff(np.unique(grid.coords[:, 0]))
    assert set(steps[steps < 1.5 * stride].tolist()) <= {math.floor(stride), math.ceil(stride)}
    # The level read for 0.5 µm/px is the finest level not coarser than 0.5 µm/px.
    with open_slide(s.path) as slide:
        assert grid.level == slide.best_level_for_mpp(0.5)
        x, y = (int(v) for v in grid.coords[0])
        tile = slide.read_region_mpp((x, y), (256, 256), 0.5)
    assert tile.shape == (256, 256, 3)


@pytest.mark.parametrize("mpp", [0.25, 0.2631, 0.5])
def test_tiles_fall_inside_tissue(
    slides: dict[float, TiledSlide], tissue: dict[float, TissueResult], mpp: float
) -> None:
    s = slides[mpp]
    grid = grid_for(s, tissue[mpp])
    assert len(grid) >= 20
    f = grid.footprint_px
    # Ground truth tolerance: one segmentation pixel (8 µm) around the known tissue.
    tol_px = math.ceil(8.0 / mpp)
    near = cv2.dilate(s.truth.astype(np.uint8), np.ones((2 * tol_px + 1,) * 2, np.uint8)) > 0
    sat = cv2.integral(s.truth.astype(np.uint8))
    # The mask is 8 µm/px, so a tile's edge may be off by one mask pixel on each side.
    edge_error = 2 * 8.0 / (256 * 0.5)
    true_fractions = []
    for (x, y), frac in zip(grid.coords, grid.tissue_fraction, strict=True):
        assert frac >= 0.5
        assert near[y + f // 2, x + f // 2], (x, y)
        true_frac = (sat[y + f, x + f] - sat[y, x + f] - sat[y + f, x] + sat[y, x]) / f**2
        assert true_frac >= 0.5 - edge_error, (x, y, true_frac)
        true_fractions.append(true_frac)
    error = np.abs(np.asarray(true_fractions) - grid.tissue_fraction)
    assert error.max() <= edge_error and error.mean() <= 0.05
    # And every tile that is wholly tissue in the truth was kept.
    xs, ys = np.unique(grid.coords[:, 0]), np.unique(grid.coords[:, 1])
    kept = {(int(x), int(y)) for x, y in grid.coords}
    for y in ys:
        for x in xs:
            if (sat[y + f, x + f] - sat[y, x + f] - sat[y + f, x] + sat[y, x]) == f * f:
                assert (int(x), int(y)) in kept


@pytest.mark.parametrize("mpp", [0.25, 0.2631, 0.5])
def test_coords_are_int64_row_major_top_left_inside_the_slide(
    slides: dict[float, TiledSlide], tissue: dict[float, TissueResult], mpp: float
) -> None:
    s = slides[mpp]
    grid = grid_for(s, tissue[mpp])
    c = grid.coords
    assert c.dtype == np.int64 and c.ndim == 2 and c.shape[1] == 2 and c.flags.c_contiguous
    assert grid.tissue_fraction.dtype == np.float32 and grid.tissue_fraction.shape == (len(c),)
    order = np.lexsort((c[:, 0], c[:, 1]))  # by y, then x
    assert (order == np.arange(len(c))).all()
    assert len(np.unique(c, axis=0)) == len(c)
    w0, h0 = grid.slide_dimensions
    assert (c >= 0).all()
    assert (c[:, 0] + grid.footprint_px <= w0).all() and (c[:, 1] + grid.footprint_px <= h0).all()
    # The same physical tissue gives about the same number of tiles at every scanner resolution.
    assert len(grid) == pytest.approx(len(grid_for(slides[0.5], tissue[0.5])), rel=0.2)


def test_stride_smaller_than_tile_overlaps(
    slides: dict[float, TiledSlide], tissue: dict[float, TissueResult]
) -> None:
    s, t = slides[0.25], tissue[0.25]
    plain = grid_for(s, t)
    half = grid_for(s, t, TileParams(stride_px=128))
    assert half.stride_px == 128 and half.footprint_px == 512
    assert len(half) > 3 * len(plain)
    steps = np.unique(np.diff(np.unique(half.coords[:, 0])))
    assert steps.min() == 256  # neighbours overlap by half a tile
    # The stride-128 grid contains the stride-256 grid (even positions coincide exactly).
    assert {tuple(p) for p in plain.coords.tolist()} <= {tuple(p) for p in half.coords.tolist()}


def test_min_tissue_fraction_controls_the_edge(
    slides: dict[float, TiledSlide], tissue: dict[float, TissueResult]
) -> None:
    s, t = slides[0.5], tissue[0.5]
    n = [len(grid_for(s, t, TileParams(min_tissue_fraction=f))) for f in (0.0, 0.1, 0.5, 0.9, 1.0)]
    assert n == sorted(n, reverse=True) and n[0] > n[2] > n[4]
    w0, h0 = slides[0.5].truth.shape[::-1]
    assert n[0] == (w0 // 256) * (h0 // 256)  # threshold 0 keeps every whole tile


def test_no_tissue_gives_an_empty_grid(tmp_path: Path) -> None:
    img, _ = render_tissue(0.5, blank=True)
    path = write_pyramid(tmp_path / "blank.tif", img, mpp=0.5)
    with open_slide(path) as slide:
        t = detect_tissue(slide)
        grid = tile_grid(slide, t)
    assert t.is_empty
    assert len(grid) == 0 and grid.coords.shape == (0, 2) and grid.coords.dtype == np.int64
    with pytest.raises(NoTissueError, match="no_tissue"):
        t.require_tissue()
    write_coords_h5(tmp_path / "blank.h5", grid, "blank")
    back = read_coords_h5(tmp_path / "blank.h5")
    assert back.coords.shape == (0, 2) and back.complete


def test_tissue_of_another_slide_is_refused(
    slides: dict[float, TiledSlide], tissue: dict[float, TissueResult]
) -> None:
    with (
        open_slide(slides[0.5].path) as slide,
        pytest.raises(InputError, match="detect tissue on this slide"),
    ):
        tile_grid(slide, tissue[0.25])


def test_tissue_fraction_is_exact() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((40, 60)) > 0.5
    up = 4  # compare with a brute-force count on the mask upsampled 4x (level-0 = 4 px per mask px)
    big = mask.repeat(up, 0).repeat(up, 1)
    xs = np.array([0, 5, 33, 117, 200])
    ys = np.array([0, 7, 50, 101])
    f = 37.0
    got = _tissue_fraction(mask, (up, up), xs, ys, f, (60 * up, 40 * up))
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            want = big[y : y + 37, x : x + 37].mean()
            assert got[i, j] == pytest.approx(want, abs=1e-9)


def test_params_are_validated_and_match_the_config() -> None:
    with pytest.raises(ConfigError, match="min_tissue_fraction"):
        TileParams(min_tissue_fraction=1.5)
    with pytest.raises(ConfigError, match="tile_px"):
        TileParams(tile_px=0)
    from wsi_mil.config import TilingConfig

    params = TileParams(**TilingConfig().model_dump())
    assert params.effective_stride_px == 256 and params.mpp == 0.5


# --- coords HDF5 ------------------------------------------------------------------------------------
def test_coords_h5_round_trip(
    slides: dict[float, TiledSlide], tissue: dict[float, TissueResult], tmp_path: Path
) -> None:
    grid = grid_for(slides[0.2631], tissue[0.2631])
    # Unicode and spaces in the path (R22).
    path = write_coords_h5(
        tmp_path / "out dir é" / "s µ.h5", grid, "s0.2631", extra_attrs={"config_hash": "abc", "n": 3}
    )
    assert sorted(p.name for p in path.parent.iterdir()) == ["s µ.h5"]  # no temp file left
    with h5py.File(path, "r") as h5:
        assert h5["coords"].dtype == np.int64 and h5["coords"].shape == (len(grid), 2)
        attrs = dict(h5.attrs)
    for key in (
        "mpp",
        "tile_px",
        "footprint_px",
        "slide_mpp",
        "slide_width",
        "slide_height",
        "stride_px",
        "min_tissue_fraction",
        "slide_id",
        "complete",
    ):
        assert key in attrs, key
    assert attrs["footprint_px"] == 487 and attrs["complete"]
    back = read_coords_h5(path)
    assert back.slide_id == "s0.2631" and back.complete
    assert back.attrs["config_hash"] == "abc" and back.attrs["n"] == 3
    np.testing.assert_array_equal(back.coords, grid.coords)
    np.testing.assert_array_equal(back.grid.tissue_fraction, grid.tissue_fraction)
    assert back.grid.attrs() == grid.attrs()
    assert back.grid.footprint_px_exact == grid.footprint_px_exact


def test_coords_h5_failed_write_keeps_the_previous_file(
    slides: dict[float, TiledSlide], tissue: dict[float, TissueResult], tmp_path: Path
) -> None:
    grid = grid_for(slides[0.5], tissue[0.5])
    path = write_coords_h5(tmp_path / "s.h5", grid, "s")
    before = path.read_bytes()
    with pytest.raises(TypeError):  # h5py cannot store an arbitrary object: the write fails midway
        write_coords_h5(path, grid, "s", extra_attrs={"bad": object()})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]


def test_incomplete_or_foreign_files_are_not_taken_as_done(tmp_path: Path) -> None:
    partial = tmp_path / "partial.h5"
    with h5py.File(partial, "w") as h5:
        h5.create_dataset("coords", data=np.zeros((3, 2), np.int64))
        h5.attrs["mpp"] = 0.5
    with pytest.raises(BagFileError, match="incomplete"):
        read_coords_h5(partial)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as h5:
        h5.attrs["complete"] = True
        h5.create_dataset("features", data=np.zeros((3, 4)))
    with pytest.raises(BagFileError, match="coords"):
        read_coords_h5(foreign)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5 at all")
    with pytest.raises(BagFileError):
        read_coords_h5(garbage)
    with pytest.raises(BagFileError):
        read_coords_h5(tmp_path / "missing.h5")

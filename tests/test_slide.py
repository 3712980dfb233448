"""The slide layer: both backends agree, metadata, reads, budgets and R1 to R8."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsi_mil.demo.pyramid import write_pyramid
from wsi_mil.errors import (
    InvalidMPPError,
    MissingMPPError,
    SlideOpenError,
    SlideReadError,
    SlideTooLargeError,
    WsiMilError,
)
from wsi_mil.slide import SlideLimits, load_mpp_overrides, open_slide


@pytest.mark.parametrize("fmt,mpp", [("svs", 0.5), ("tif", 0.2631), ("tif", 0.25)])
def test_backends_agree_on_levels_mpp_and_pixels(make_slide, fmt, mpp):
    path = make_slide(f"agree_{fmt}_{mpp}", fmt=fmt, mpp=mpp)
    with open_slide(path, "openslide") as a, open_slide(path, "tiffslide") as b:
        assert a.backend_name == "openslide" and b.backend_name == "tiffslide"
        assert a.level_count == b.level_count == 3
        assert a.level_dimensions == b.level_dimensions == ((2048, 1536), (512, 384), (128, 96))
        assert a.level_downsamples == b.level_downsamples == (1.0, 4.0, 16.0)
        assert a.mpp == pytest.approx(mpp) and b.mpp == pytest.approx(mpp)
        assert a.slide_id == b.slide_id == path.stem
        rng = np.random.default_rng(0)
        for _ in range(30):
            level = int(rng.integers(0, 3))
            x, y = (int(v) for v in rng.integers(-300, 2100, 2))
            w, h = (int(v) for v in rng.integers(1, 200, 2))
            ra, rb = a.read_region((x, y), level, (w, h)), b.read_region((x, y), level, (w, h))
            assert ra.dtype == np.uint8 and ra.shape == (h, w, 3)
            np.testing.assert_array_equal(ra, rb)


def test_svs_metadata_objective_and_associated(make_slide):
    path = make_slide("meta", fmt="svs", mpp=0.5)
    for backend in ("openslide", "tiffslide"):
        with open_slide(path, backend) as s:
            assert s.objective_power == 20
            assert "thumbnail" in s.associated_image_names
            thumb = s.read_associated_image("thumbnail")
            assert thumb.ndim == 3 and thumb.shape[2] == 3 and thumb.dtype == np.uint8
            d = s.describe()
            assert d["mpp"] == 0.5 and d["backend"] == backend and d["level_count"] == 3


def test_auto_prefers_openslide_and_reads_outside_as_white(make_slide):
    with open_slide(make_slide("auto")) as s:
        assert s.backend_name == "openslide"
        region = s.read_region((-50, -50), 0, (40, 40))
        assert (region == 255).all()


def test_read_region_mpp_resizes_from_best_level(make_slide):
    path = make_slide("mppread", fmt="tif", mpp=0.25)
    with open_slide(path) as s:
        assert s.best_level_for_mpp(0.5) == 0  # level 1 is 1.0 µm/px: too coarse
        assert s.best_level_for_mpp(1.0) == 1
        assert s.best_level_for_mpp(8.0) == 2
        out = s.read_region_mpp((100, 100), (64, 48), 0.5)
        assert out.shape == (48, 64, 3)
        # 0.5 µm/px from a 0.25 µm/px level 0 is a 2x area downsample of the level-0 read
        import cv2

        ref = cv2.resize(s.read_region((100, 100), 0, (128, 96)), (64, 48), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(out, ref)


def test_thumbnail_bounded(make_slide):
    with open_slide(make_slide("thumb")) as s:
        t = s.get_thumbnail(300)
        assert max(t.shape[:2]) == 300 and t.shape[2] == 3


# --- R1 to R8 -----------------------------------------------------------------------------------
def test_r1_zero_byte(tmp_path):
    p = tmp_path / "empty.svs"
    p.write_bytes(b"")
    with pytest.raises(SlideOpenError, match="empty"):
        open_slide(p)


@pytest.mark.parametrize("content", [b"this is not a slide\n" * 50, bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8))])
@pytest.mark.parametrize("backend", ["auto", "openslide", "tiffslide"])
def test_r2_garbage(tmp_path, content, backend):
    p = tmp_path / "garbage.svs"
    p.write_bytes(content)
    with pytest.raises(SlideOpenError):
        open_slide(p, backend)


def test_missing_file(tmp_path):
    with pytest.raises(SlideOpenError, match="does not exist"):
        open_slide(tmp_path / "nope.svs")
    assert issubclass(SlideOpenError, OSError) and issubclass(SlideOpenError, WsiMilError)


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("backend", ["auto", "openslide", "tiffslide"])
@pytest.mark.parametrize("fmt", ["svs", "tif"])
def test_r3_truncated(make_slide, tmp_path, fraction, backend, fmt):
    data = make_slide(f"trunc_src_{fmt}", fmt=fmt).read_bytes()
    p = tmp_path / f"trunc.{fmt}"
    p.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(SlideOpenError, match="truncated|not a readable|not a slide|could not open"):
        open_slide(p, backend)


def _corrupt_tile(src: Path, dst: Path, tile_index: int) -> None:
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        off = tif.pages[0].dataoffsets[tile_index]
        n = tif.pages[0].databytecounts[tile_index]
    data[off + 2 : off + n] = b"\x00\xff" * ((n - 2) // 2) + b"\x00" * ((n - 2) % 2)
    dst.write_bytes(bytes(data))


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_r4_corrupt_tile_is_a_read_error_and_reopen_recovers(make_slide, tmp_path, backend):
    src = make_slide("corrupt_src", fmt="tif")
    p = tmp_path / "corrupt.tif"
    # tile (row 2, col 3) of an 8x6 grid of 256 px tiles
    _corrupt_tile(src, p, 2 * 8 + 3)
    with open_slide(p, backend) as s:
        with pytest.raises(SlideReadError, match=r"\(768, 512\)"):
            s.read_region((768, 512), 0, (256, 256))
        s.reopen()
        good = s.read_region((0, 0), 0, (256, 256))
        assert good.shape == (256, 256, 3)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_r4_a_whole_level_read_names_the_corrupt_tile(make_slide, tmp_path, backend):
    """The tissue-segmentation / QC read of a whole level hits the corrupt tile: the error names its location."""
    src = make_slide("corrupt_src", fmt="tif")
    p = tmp_path / "corrupt_level.tif"
    _corrupt_tile(src, p, 2 * 8 + 3)  # level-0 tile (768, 512)
    with open_slide(p, backend) as s:
        with pytest.raises(SlideReadError, match=r"1 corrupt tile\(s\) of 256x256 level-0 px at level 0, top-left at level-0 \(768, 512\)"):
            s.read_region((0, 0), 0, s.dimensions)
        with pytest.raises(SlideReadError, match=r"\(768, 512\).*--skip-unreadable-tiles"):
            s.read_downsampled(1.0)  # the segmentation/thumbnail path
        assert s.read_region((0, 0), 0, (256, 256)).shape == (256, 256, 3)  # the handle still works


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_r4_opt_in_tolerance_reopens_skips_and_counts_the_tile(make_slide, tmp_path, backend):
    src = make_slide("corrupt_src", fmt="tif")
    p = tmp_path / "corrupt_skip.tif"
    _corrupt_tile(src, p, 2 * 8 + 3)
    with open_slide(p, backend) as s, open_slide(src, backend) as ref:
        s.skip_unreadable = True
        region = s.read_region((0, 0), 0, s.dimensions)
        assert s.skipped_tiles == [(768, 512, 256, 256)]
        assert (region[512:768, 768:1024] == 255).all()  # the skipped tile reads as glass
        expected = ref.read_region((0, 0), 0, ref.dimensions)
        keep = np.ones(region.shape[:2], bool)
        keep[512:768, 768:1024] = False
        assert np.array_equal(region[keep], expected[keep])  # every other tile is read
        s.read_region((700, 500), 0, (400, 300))  # the same tile again: counted once
        assert s.skipped_tiles == [(768, 512, 256, 256)]


def test_r4_prepare_slide_fails_naming_the_tile_or_skips_on_request(tmp_path):
    """Tissue detection and the QC thumbnail of the zoo's corrupt-tile slide (the reads before any tile)."""
    import json

    from wsi_mil.config import TilingConfig, TissueConfig
    from wsi_mil.demo.broken import write_broken_slides
    from wsi_mil.runs.prepare import prepare_slide

    paths = write_broken_slides(tmp_path / "zoo")
    x, y, _, _ = json.loads((tmp_path / "zoo" / "broken_slides.json").read_text())["corrupt_tile_box_level0_px"]
    with open_slide(paths["corrupt_tile"]) as s:
        with pytest.raises(SlideReadError, match=rf"top-left at level-0 \({x}, {y}\)"):
            prepare_slide(s, TissueConfig(), TilingConfig(), tmp_path / "qc")
    with open_slide(paths["corrupt_tile"]) as s:
        prepared = prepare_slide(s, TissueConfig(), TilingConfig(), tmp_path / "qc", skip_unreadable=True)
    assert prepared.skipped_tiles == ((x, y, 256, 256),) and len(prepared.grid.coords) > 0


def test_r5_huge_header_rejected_without_allocation(tmp_path):
    # a small valid slide whose header is patched to claim 10^6 x 10^6 pixels
    p = write_pyramid(tmp_path / "huge.tif", np.full((512, 512, 3), 200, np.uint8), mpp=0.5, downsamples=(1,))
    with tifffile.TiffFile(p, mode="r+b") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(1_000_000)
        tif.pages[0].tags["ImageLength"].overwrite(1_000_000)
    assert p.stat().st_size < 100_000
    t0 = time.perf_counter()
    with pytest.raises(SlideTooLargeError, match="slide budget"):
        open_slide(p, "tiffslide")  # tiffslide itself opens it and would return zeros
    with pytest.raises((SlideTooLargeError, SlideOpenError)):
        open_slide(p, "auto")
    assert time.perf_counter() - t0 < 5


def test_r5_dimension_budget(make_slide):
    with pytest.raises(SlideTooLargeError, match="slide budget"):
        open_slide(make_slide("budget"), limits=SlideLimits(max_slide_px=1000 * 1000))


def test_r6_read_budget_refused_before_allocation(make_slide):
    with open_slide(make_slide("readbudget"), limits=SlideLimits(max_read_px=100 * 100)) as s:
        with pytest.raises(SlideTooLargeError, match="read budget"):
            s.read_region((0, 0), 0, (101, 100))
        with pytest.raises(SlideTooLargeError):
            s.get_thumbnail(1024)
        assert s.read_region((0, 0), 0, (100, 100)).shape == (100, 100, 3)


def test_r7_missing_mpp_names_slide_and_remedies(make_slide):
    path = make_slide("nompp", mpp=None)
    for backend in ("openslide", "tiffslide"):
        with pytest.raises(MissingMPPError) as info:
            open_slide(path, backend)
        msg = str(info.value)
        assert "nompp" in msg and "--mpp-override" in msg and "--mpp-override-csv" in msg
        with open_slide(path, backend, mpp=0.3) as s:
            assert s.mpp == 0.3 and s.mpp_source == "override"


@pytest.mark.parametrize("bad", [0.0, 25.0, -1.0, float("nan")])
def test_r8_implausible_mpp(make_slide, bad):
    with pytest.raises(InvalidMPPError, match="plausible range"):
        open_slide(make_slide("mppok"), mpp=bad)


def test_r8_implausible_mpp_in_metadata(make_slide):
    with pytest.raises(InvalidMPPError, match=r"\[0.05, 10.0\]"):
        open_slide(make_slide("mpp25", mpp=25.0))


def test_mpp_override_csv(tmp_path):
    p = tmp_path / "mpp.csv"
    p.write_text("\ufeffslide_id, mpp\n007,0.25\nb,0.5\n", encoding="utf-8")
    assert load_mpp_overrides(p) == {"007": 0.25, "b": 0.5}
    p.write_text("slide_id,mpp\na,30\n")
    with pytest.raises(InvalidMPPError, match="line 2"):
        load_mpp_overrides(p)

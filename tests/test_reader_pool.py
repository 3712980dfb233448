"""Tile-reading processes that live for the whole run (``workers=N``): the bags are those of the per-slide
path, each worker opens each slide once, a read error or a dead worker fails only its slide, and a killed
run leaves no worker behind and resumes to the same bags."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from conftest import tissue_image
from extract_helpers import (
    FAST_ARGS,
    fast_config,
    group_members,
    manifest,
    start_cli,
    temp_files,
    wait_for,
    write_slide,
)

from wsi_mil.demo.pyramid import write_pyramid
from wsi_mil.errors import ReaderProcessError, SlideError, SlideOpenError
from wsi_mil.features import reader_pool as pool_mod
from wsi_mil.features.stream import TileBatches, TileSource, read_batches, series_batches
from wsi_mil.runs import extract as extract_mod
from wsi_mil.runs.extract import run_extract
from wsi_mil.slide import open_slide
from wsi_mil.slide import readers as readers_mod
from wsi_mil.store.bag_file import BagWriter

pytest_plugins = ("extract_fixtures",)  # one_torch_thread
pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: processing order: 15 to 145 tiles, .tif and .svs, a slide without tissue and a broken file in the middle
ORDER = ("a", "blank", "big", "bad", "b")


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pool_slides")
    img, _ = tissue_image(3072, 2304, seed=7, blobs=8)
    out = {
        "a": write_slide(folder / "a.tif", size=(1536, 1024), seed=11),
        "blank": write_slide(folder / "blank.tif", size=(1024, 768), blank=True),
        "big": write_pyramid(folder / "big.tif", img, mpp=0.5, fmt="tif"),  # 145 tiles: 5 reads of 32
        "bad": folder / "bad.svs",
        "b": write_slide(folder / "b.svs", size=(1536, 1024), mpp=0.25, seed=12, upscale=2),  # read and resized
    }
    out["bad"].write_text("not a slide\n")
    return out


@pytest.fixture(scope="module")
def series(slides: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The per-slide path: every tile read in series in this process (``workers=0``)."""
    out = tmp_path_factory.mktemp("series")
    summary = run_extract([slides[k] for k in ORDER], out, fast_config(workers=0), progress=False, threads=1)
    assert _statuses(summary.records) == {"a": "done", "blank": "no_tissue", "big": "done", "bad": "failed", "b": "done"}
    return out


def _statuses(records: list[dict[str, Any]]) -> dict[str, str]:
    return {r["slide_id"]: r["status"] for r in records}


def _bag(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    with h5py.File(path, "r") as f:
        return np.asarray(f["features"][:]), np.asarray(f["coords"][:]), dict(f.attrs)


def _assert_same_bags(expected: Path, actual: Path, ids: list[str]) -> None:
    """Features array-equal, coords equal, every attribute equal (a bag holds no timings)."""
    for sid in ids:
        fa, ca, aa = _bag(expected / "features" / f"{sid}.h5")
        fb, cb, ab = _bag(actual / "features" / f"{sid}.h5")
        np.testing.assert_array_equal(cb, ca, err_msg=sid)
        np.testing.assert_array_equal(fb, fa, err_msg=sid)
        assert sorted(ab) == sorted(aa), sid
        for key, value in aa.items():
            assert np.array_equal(ab[key], value), (sid, key, ab[key], value)


class _Recorded(pool_mod.ReaderPool):
    """The run's pool, kept for the test to look at."""

    made: list[pool_mod.ReaderPool] = []
    depth_override: int | None = None

    def __init__(self, n_workers: int, **kw: Any) -> None:
        if self.depth_override is not None:
            kw["depth"] = self.depth_override
        super().__init__(n_workers, **kw)
        _Recorded.made.append(self)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> type[_Recorded]:
    monkeypatch.setattr(_Recorded, "made", [])
    monkeypatch.setattr(extract_mod, "ReaderPool", _Recorded)
    return _Recorded


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# --- the bags ------------------------------------------------------------------------------------------
def test_bags_equal_the_per_slide_path_and_each_worker_opens_each_slide_once(
    slides: dict[str, Path], series: Path, tmp_path: Path, recorded: type[_Recorded]
) -> None:
    out = tmp_path / "pool"
    summary = run_extract([slides[k] for k in ORDER], out, fast_config(workers=2), progress=False, threads=1)
    assert _statuses(summary.records) == _statuses(manifest(series).values())  # type: ignore[arg-type]
    done = [k for k in ORDER if _statuses(summary.records)[k] == "done"]
    _assert_same_bags(series, out, done)
    rows = manifest(out)
    assert rows["bad"]["error_class"] == manifest(series)["bad"]["error_class"] == "SlideOpenError"
    assert json.loads((out / "run.json").read_text())["loader"] == "processes"

    (pool,) = recorded.made  # one pool for the whole run
    opened = {(pid, Path(path).stem): n for (pid, path), n in pool.opens.items()}
    assert opened and set(opened.values()) == {1}, opened  # never twice by one worker
    assert {sid for _, sid in opened} == set(done)  # the slides without tiles never reach the workers
    assert len({pid for pid, _ in opened}) == 2  # both workers read
    assert multiprocessing.active_children() == []  # closed with the run
    assert not any(_alive(pid) for pid, _ in opened)

    # the gap before each slide's first batch, for every slide encoded after another
    gaps = {sid: rows[sid]["gap_s"] for sid in done}
    assert gaps["a"] == "" and all(float(gaps[sid]) >= 0 for sid in done[1:]), gaps
    totals = json.loads((out / "run.json").read_text())["totals"]
    assert totals["slide_gap_s"]["n"] == len(done) - 1


def test_a_file_checked_in_this_run_is_not_scanned_again_unless_it_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_slide(tmp_path / "x.tif", size=(1024, 768), seed=3)
    scans: list[Path] = []
    real = readers_mod.check_tiff_integrity
    monkeypatch.setattr(readers_mod, "check_tiff_integrity", lambda p: scans.append(p) or real(p))
    with open_slide(path) as slide:
        stamp, mpp = slide.file_stamp, slide.mpp
    assert stamp is not None and len(scans) == 1
    with open_slide(path, verified=stamp):
        pass
    source = TileSource(str(path), "tiffslide", mpp, 10**11, 10**8, 0.5, 64, False, verified_stamp=stamp)
    tiles, ok = TileBatches(source).read_tiles(np.array([[0, 0], [64, 0]]))  # a reader opening it
    assert tiles.shape == (2, 64, 64, 3) and ok.all()
    assert len(scans) == 1  # neither scanned it again

    later = stamp.mtime_ns + 10**9  # rewritten in place (same size): checked again
    os.utime(path, ns=(later, later))
    with open_slide(path, verified=stamp):
        pass
    assert len(scans) == 2

    short = tmp_path / "short.tif"  # a truncated copy moved over it: refused as ever
    short.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    os.replace(short, path)
    with pytest.raises(SlideOpenError, match="truncated"):
        open_slide(path, verified=stamp)


# --- the pool itself -----------------------------------------------------------------------------------
def _source(path: Path, tile_px: int = 128) -> tuple[TileSource, np.ndarray]:
    with open_slide(path, backend="tiffslide") as slide:
        source = TileSource(str(path), "tiffslide", slide.mpp, 10**11, 10**8, 0.5, tile_px, False, slide.file_stamp)
        w, h = slide.dimensions
        step = round(tile_px * 0.5 / slide.mpp)
    coords = np.array([(x, y) for y in range(0, h - step, 2 * step) for x in range(0, w - step, step)], np.int64)
    return source, coords


def _assert_same_as_series(stream: Any, source: TileSource, coords: np.ndarray, size: int) -> None:
    got = list(stream)
    expected = list(series_batches(TileBatches(source, coords), size))
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        for key in ("tiles", "index", "ok"):
            np.testing.assert_array_equal(g[key].numpy(), e[key].numpy())


def test_the_pool_serves_each_slide_in_order_and_keeps_errors_with_their_slide(slides: dict[str, Path]) -> None:
    (a, ca), (b, cb), (big, cbig) = (_source(slides[k]) for k in ("a", "b", "big"))
    gone = TileSource(**{**a.__dict__, "path": str(slides["a"].with_name("gone.tif")), "verified_stamp": None})
    with pool_mod.ReaderPool(2, depth=2) as pool:
        streams = [
            pool.submit(a, ca, read_batches(len(ca), 8)),
            pool.submit(gone, ca, read_batches(len(ca), 8)),
            pool.submit(big, cbig, read_batches(len(cbig), 16)),
            pool.submit(b, cb, read_batches(len(cb), 8)),
        ]
        pids = pool.worker_pids()
        _assert_same_as_series(streams[0], a, ca, 8)
        with pytest.raises(SlideOpenError, match="does not exist"):  # raised where its batches are taken
            list(streams[1])
        streams[1].close()
        first = next(iter(streams[2]))  # dropped mid-way: the rest of it is discarded
        assert first["tiles"].shape[0] == 16
        streams[2].close()
        with pytest.raises(RuntimeError, match="dropped"):  # never a short bag
            list(streams[2])
        _assert_same_as_series(streams[3], b, cb, 8)  # the next slide is whole and in order
        assert pool.worker_pids() == pids  # no worker was replaced
    assert not any(_alive(pid) for pid in pids)


# --- faults --------------------------------------------------------------------------------------------
def test_a_worker_killed_mid_slide_fails_that_slide_and_the_next_slides_complete(
    slides: dict[str, Path], series: Path, tmp_path: Path, recorded: type[_Recorded], monkeypatch: pytest.MonkeyPatch
) -> None:
    # One batch held per worker and reads of 16 tiles (10 for "big"; the forward passes of 8 are the same):
    # when the slide's first rows are written at most 4 of its reads were handed out and at most 2 more go
    # to the other worker before the frozen one's last result is taken, so it is handed another read of
    # the slide, which it holds when it is killed.
    monkeypatch.setattr(recorded, "depth_override", 1)
    monkeypatch.setattr(extract_mod, "read_batch_size", lambda batch_size: 16)
    killed: list[int] = []
    real_append = BagWriter.append

    def append(self: BagWriter, features: np.ndarray, coords: np.ndarray) -> None:
        if self.dest.stem == "big" and not killed:
            pid = recorded.made[0].worker_pids()[0]
            os.kill(pid, signal.SIGSTOP)  # frozen: it returns nothing more
            threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()
            killed.append(pid)
        real_append(self, features, coords)

    monkeypatch.setattr(BagWriter, "append", append)
    out = tmp_path / "out"
    ids = ["a", "big", "b"]
    summary = run_extract([slides[k] for k in ids], out, fast_config(workers=2), progress=False, threads=1)
    assert _statuses(summary.records) == {"a": "done", "big": "failed", "b": "done"}
    rows = manifest(out)
    assert rows["big"]["error_class"] == "ReaderProcessError"
    assert f"pid {killed[0]}" in rows["big"]["error"] and "SIGKILL" in rows["big"]["error"]
    assert str(slides["big"]) in rows["big"]["error"] and "--workers" in rows["big"]["error"]
    assert not (out / "features" / "big.h5").exists() and temp_files(out / "features") == []
    _assert_same_bags(series, out, ["a", "b"])
    (pool,) = recorded.made
    readers = {pid for pid, _ in pool.opens}
    assert len(readers - {killed[0]}) >= 1 and not _alive(killed[0])  # a new worker took its place
    assert multiprocessing.active_children() == []
    assert issubclass(ReaderProcessError, SlideError)  # one slide's failure: the batch goes on


def test_sigkill_of_the_run_leaves_no_worker_and_the_rerun_gives_the_same_bags(
    slides: dict[str, Path], series: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    features = out / "features"
    inputs = [str(slides[k]) for k in ORDER]
    proc = start_cli("extract", *inputs, "--out", str(out), *FAST_ARGS, "--workers", "2", start_new_session=True)
    try:
        while True:  # one bag written and the next being written: freeze, check, kill
            assert wait_for(lambda: list(features.glob("*.h5")) and temp_files(features), 120, proc), proc.communicate()
            os.kill(proc.pid, signal.SIGSTOP)
            if temp_files(features):
                os.kill(proc.pid, signal.SIGKILL)
                break
            os.kill(proc.pid, signal.SIGCONT)
        assert proc.wait(30) == -signal.SIGKILL
        # the forkserver and the tile-reading processes go by themselves
        assert wait_for(lambda: not group_members(proc.pid), 20, poll=0.1), group_members(proc.pid)
    finally:
        proc.communicate()
        if group_members(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    assert temp_files(features), "killed before a bag was being written: the test proves nothing"

    summary = run_extract([slides[k] for k in ORDER], out, fast_config(workers=2), progress=False, threads=1)  # resume
    statuses = _statuses(summary.records)
    assert {statuses[k] for k in ("a", "big", "b")} <= {"done", "skipped"} and statuses["bad"] == "failed"
    assert temp_files(features) == []
    assert sorted(p.stem for p in features.glob("*.h5")) == ["a", "b", "big"]
    _assert_same_bags(series, out, ["a", "big", "b"])
    assert multiprocessing.active_children() == []

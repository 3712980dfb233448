"""``wsi-mil extract`` under process-level faults: SIGKILL (R10), SIGINT/SIGTERM (R12), concurrent
processes and overlapping shards (R13), a file-size limit (R14), and memory over a long run.

Every run of the command is a fresh interpreter: children forked from this process would inherit
OpenMP's thread pool and may hang in their first parallel region (seen with MKL's erfinv in timm's
weight init).
"""

from __future__ import annotations

import contextlib
import gc
import json
import multiprocessing
import os
import resource
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from extract_helpers import (
    FAST_ARGS,
    assert_same_features,
    fast_config,
    group_members,
    manifest,
    run_cli,
    signal_mid_slide,
    start_cli,
    temp_files,
    wait_for,
    write_slide,
)

from wsi_mil.runs.extract import run_extract
from wsi_mil.store import as_output_error, is_disk_error
from wsi_mil.store.bag_file import BagWriter, bag_is_complete

pytest_plugins = ("extract_fixtures",)  # cohort, reference, one_torch_thread
pytestmark = pytest.mark.usefixtures("one_torch_thread")

IDS = ("s00", "s01", "s02", "s03")


def _slide_args(paths: list[Path]) -> list[str]:
    return [str(p) for p in paths]


def _kill_session(proc: subprocess.Popen[str]) -> None:
    """Kill what is left of a killed command's session (its loader worker notices the death only later)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_all(*commands: tuple[str, ...], timeout: float = 300) -> list[subprocess.Popen[str]]:
    """Start every command at once (each its own interpreter); wait for all."""
    procs = [start_cli(*c) for c in commands]
    for proc in procs:
        proc.communicate(timeout=timeout)
    return procs


# --- R10 ----------------------------------------------------------------------------------------------
def test_R10_sigkill_never_leaves_a_partial_file_and_the_rerun_matches(
    cohort: list[Path], reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc = start_cli("extract", *_slide_args(cohort), "--out", str(out), *FAST_ARGS, start_new_session=True)
    try:
        assert wait_for(lambda: temp_files(out / "features"), 120, proc), proc.communicate()
        os.kill(proc.pid, signal.SIGKILL)  # like the OOM killer: no clean-up runs
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        _kill_session(proc)
        proc.communicate()
    features = out / "features"
    assert temp_files(features), "killed before it started writing: the test proves nothing"
    for final in features.glob("*.h5"):  # absent or complete, never partial
        assert bag_is_complete(final)
        assert_same_features(reference, out, [final.stem])
    unfinished = {p.name.split(".h5.")[0].removeprefix(".tmp-") for p in temp_files(features)}
    assert all(not (features / f"{sid}.h5").exists() for sid in unfinished)

    summary = run_extract(cohort, out, fast_config(), progress=False)  # resume
    assert summary.exit_code == 0, summary.text()
    assert {r["status"] for r in summary.records} <= {"done", "skipped"}
    assert {r["slide_id"] for r in summary.records if r["status"] == "done"} >= unfinished
    assert temp_files(features) == []  # the killed writer's temp file is gone
    assert_same_features(reference, out, IDS, atol=1e-5)


# --- R12 ----------------------------------------------------------------------------------------------
@pytest.fixture
def sigint_not_ignored() -> Iterator[None]:
    """A command started from a background job (``cmd &`` in a script, ``nohup``) inherits SIGINT ignored,
    and Python then installs no Ctrl-C handler: the command rightly runs on. The test wants a terminal's
    Ctrl-C, so its command starts with SIGINT at its default (a Python handler here is reset at exec)."""
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("sigint_not_ignored")
@pytest.mark.parametrize(
    "sig,workers",
    [(signal.SIGINT, "-1"), (signal.SIGTERM, "1")],
    ids=["SIGINT, reading thread", "SIGTERM (docker stop), loader process"],
)
def test_R12_interrupt_mid_slide_cleans_up_and_exits_130(
    cohort: list[Path], tmp_path: Path, sig: int, workers: str
) -> None:
    out = tmp_path / "out"
    proc = start_cli(
        "extract", *_slide_args(cohort), "--out", str(out), *FAST_ARGS, "--workers", workers, start_new_session=True
    )
    try:
        current = signal_mid_slide(proc, out / "features", sig)
        proc.wait(timeout=60)  # the command itself must exit promptly
        # and leaves no process behind: its tile-reading processes were stopped and joined before it exited
        assert wait_for(lambda: not group_members(proc.pid), 10, poll=0.05), group_members(proc.pid)
    finally:
        _kill_session(proc)  # a loader process still exiting must not hold the output pipes open
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "interrupted: rerun the same command to resume" in stdout
    assert temp_files(out / "features") == []
    assert not (out / "features" / f"{current}.h5").exists()
    rows = manifest(out)
    assert rows[current]["status"] == "interrupted"
    assert all(r["status"] in ("done", "interrupted") for r in rows.values())
    assert json.loads((out / "run.json").read_text())["interrupted"] is True


# --- R13 ----------------------------------------------------------------------------------------------
#: small slides (1.5 x 1 mm) have tissue pieces under the default 0.05 mm² floor: a lower floor for them
SMALL_TISSUE = {"tissue": {"min_tissue_area_um2": 2000.0}}


@pytest.fixture(scope="module")
def small_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "extract.yaml"
    path.write_text(yaml.safe_dump(SMALL_TISSUE))
    return path


@pytest.fixture(scope="module")
def cohort8(cohort: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    more = tmp_path_factory.mktemp("more")
    return cohort + [write_slide(more / f"t{i:02d}.tif", size=(1536, 1024), seed=40 + i) for i in range(4, 8)]


def _done_per_process(out: Path) -> dict[str, dict[str, int]]:
    return {p.name: json.loads(p.read_text())["totals"]["by_status"] for p in out.glob("run*.json")}


def test_R13_shards_and_an_overlapping_process_do_each_slide_once(
    cohort8: list[Path], small_config: Path, tmp_path: Path
) -> None:
    """Three shard processes and a fourth, unsharded, on the same folder at once (two processes on one
    folder, and overlapping shards)."""
    expected = tmp_path / "unsharded"
    summary = run_extract(cohort8, expected, fast_config(**SMALL_TISSUE), progress=False)
    assert summary.counts == {"done": 8}
    out = tmp_path / "out"
    args = ("extract", *_slide_args(cohort8), "--out", str(out), "--config", str(small_config), *FAST_ARGS, "--workers", "0")
    procs = run_all(*[(*args, "--shard", f"{i}/3") for i in range(3)], args)
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [p.stderr for p in procs]

    ids = sorted(p.stem for p in cohort8)
    assert sorted(p.stem for p in (out / "features").glob("*.h5")) == ids  # the union is the whole cohort
    assert_same_features(expected, out, ids)
    assert temp_files(out / "features") == []
    per_process = _done_per_process(out)
    assert sorted(per_process) == ["run.json", "run.shard-0-of-3.json", "run.shard-1-of-3.json", "run.shard-2-of-3.json"]
    assert sum(c.get("done", 0) for c in per_process.values()) == len(ids)  # each slide computed exactly once
    assert {r["status"] for r in manifest(out).values()} <= {"done", "skipped"}



# --- R14 ----------------------------------------------------------------------------------------------
def _limit_file_size(limit: int) -> Any:
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return set_limit


def test_R14_file_size_limit_fails_fast_naming_the_folder(cohort: list[Path], tmp_path: Path) -> None:
    config = tmp_path / "extract.yaml"
    config.write_text("thumbnail_px: 64\n")  # small QC pictures: the feature file is the first to hit the limit
    out = tmp_path / "out"
    r = run_cli(
        "extract", *_slide_args(cohort), "--out", str(out), "--config", str(config), *FAST_ARGS, "--workers", "0",
        preexec_fn=_limit_file_size(200_000), timeout=180,
    )  # fmt: skip
    assert r.returncode not in (0, 1) and r.returncode > 0, (r.returncode, r.stderr)  # stopped, not "some failed"
    assert "File too large" in r.stderr and str(out) in r.stderr and "Traceback" not in r.stderr
    assert temp_files(out / "features") == [] and list((out / "features").glob("*.h5")) == []
    rows = manifest(out)
    assert len(rows) == 1  # it stopped at the first slide instead of failing every slide the same way
    (row,) = rows.values()
    assert row["status"] == "failed" and row["error_class"] == "OutputError"


def _write_under_limit(dest: str, limit: int, queue: Any) -> None:
    """In a child: a bag too large for the limit, written without the up-front size check."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # as the command does: the write fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        with BagWriter(dest, 256, {"slide_id": "x"}) as writer:
            for i in range(64):
                writer.append(np.full((32, 256), i, np.float32), np.zeros((32, 2)))
        queue.put(("no error", ""))
    except Exception as exc:
        queue.put((type(exc).__name__, str(exc)))
    gc.collect()


def _raw_h5py_error(dest: str, limit: int, conn: Any) -> None:
    """In a child: what h5py itself raises on EFBIG (then exit at once: HDF5 may crash on tear-down)."""
    import h5py

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        f = h5py.File(dest, "w")
        f.create_dataset("features", data=np.ones((2000, 256), np.float32))
        f.close()
        conn.send(None)
    except Exception as exc:
        conn.send((type(exc).__name__, str(exc), is_disk_error(exc), str(as_output_error(exc, Path(dest).parent))))
    conn.close()
    os._exit(0)


def test_R14_hdf5_write_errors_are_recognised_and_leave_no_temp_file(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    folder = tmp_path / "features"
    folder.mkdir()
    child = ctx.Process(target=_write_under_limit, args=(str(folder / "x.h5"), 100_000, queue))
    child.start()
    child.join(60)
    assert child.exitcode == 0  # no crash in HDF5's tear-down after the failed write
    kind, message = queue.get(timeout=5)
    assert kind == "OutputError" and "File too large" in message and str(folder) in message
    assert list(folder.iterdir()) == []  # neither the file nor its temp file

    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_raw_h5py_error, args=(str(tmp_path / "raw.h5"), 100_000, sender))
    child.start()
    child.join(60)
    assert receiver.poll(5)
    result = receiver.recv()
    assert result is not None, "h5py did not fail under the limit"
    kind, message, recognised, converted = result
    assert "errno = 27" in message or "File too large" in message, message
    assert recognised, f"h5py's {kind} not recognised as a disk error: {message}"
    assert "File too large" in converted and str(tmp_path) in converted


# --- memory --------------------------------------------------------------------------------------------
@pytest.mark.slow  # 20 slides through the CLI: minutes on 2 loaded cores
def test_memory_stays_flat_over_a_long_run(small_config: Path, tmp_path: Path) -> None:
    slides = [write_slide(tmp_path / "in" / f"m{i:02d}.tif", size=(1024, 768), seed=100 + i) for i in range(20)]
    out = tmp_path / "out"
    r = run_cli(
        "extract", str(tmp_path / "in"), "--out", str(out), "--config", str(small_config), *FAST_ARGS, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = manifest(out)
    assert len(rows) == len(slides) and {r["status"] for r in rows.values()} == {"done"}
    rss = [float(rows[p.stem]["rss_mb"]) for p in slides]
    peak = [float(rows[p.stem]["peak_rss_mb"]) for p in slides]
    assert rss[-1] - rss[1] < 25, rss  # after slide 2 vs after slide 20
    assert peak[-1] - peak[1] < 25, peak


@pytest.mark.parametrize("workers", [-1, 1], ids=["reading thread", "loader process"])
def test_nothing_of_a_slide_outlives_it(cohort: list[Path], tmp_path: Path, workers: int) -> None:
    import threading

    from torch.utils.data import DataLoader

    from wsi_mil.features.stream import ThreadBatches, TileBatches
    from wsi_mil.slide import Slide

    summary = run_extract(cohort[:3], tmp_path / "out", fast_config(workers=workers), progress=False)
    assert summary.exit_code == 0
    gc.collect()
    kinds = (TileBatches, ThreadBatches, DataLoader, Slide, BagWriter)
    alive = [type(o).__name__ for o in gc.get_objects() if issubclass(type(o), kinds)]
    assert alive == []
    assert multiprocessing.active_children() == []  # loader processes are gone
    assert [t.name for t in threading.enumerate() if t.name.startswith("wsi-mil")] == []

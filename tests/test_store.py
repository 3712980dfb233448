"""The storage layer: atomic writes, temp files of killed writers, per-slide locks, error conversion."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from wsi_mil.errors import OutputError
from wsi_mil.store import (
    HDF5_LOCK_HINT,
    SlideLock,
    as_output_error,
    atomic_path,
    atomic_write_text,
    ensure_writable_dir,
    error_errno,
    is_disk_error,
    is_lock_error,
    remove_stale_temp_files,
    stale_temp_files,
    temp_name,
)


def test_atomic_write_replaces_whole_files_with_normal_permissions(tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "run.json"
    atomic_write_text(dest, "one")
    umask = os.umask(0o022)
    os.umask(umask)
    assert dest.read_text() == "one"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed half way")
    assert dest.read_text() == "one"  # the previous file survives a failed write
    assert list(dest.parent.iterdir()) == [dest]  # and no temp file is left
    with pytest.raises(KeyboardInterrupt), atomic_path(dest) as tmp:
        tmp.write_text("x")
        raise KeyboardInterrupt
    assert list(dest.parent.iterdir()) == [dest]


def test_stale_temp_files_belong_to_one_output_only(tmp_path: Path) -> None:
    x, x_h5 = tmp_path / "x.h5", tmp_path / "x.h5.h5"  # slide ids "x" and "x.h5"
    mine = [temp_name(x), temp_name(x, ".h5")]
    theirs = [temp_name(x_h5), temp_name(tmp_path / "y.h5")]
    for p in mine + theirs:
        p.write_bytes(b"partial")
    x.write_bytes(b"final")
    assert stale_temp_files(x) == sorted(mine)
    claim = SlideLock(tmp_path.parent / f"{tmp_path.name}-out", "x")
    with pytest.raises(ValueError, match="only the process holding the slide's claim"):
        remove_stale_temp_files(x, claim=claim)  # not acquired: another process may be writing them
    assert claim.acquire()
    assert remove_stale_temp_files(x, claim=claim) == 2
    claim.release()
    assert sorted(tmp_path.iterdir()) == sorted([x, *theirs])
    assert stale_temp_files(tmp_path / "missing" / "z.h5") == []


def test_slide_lock_is_exclusive_and_freed_when_its_holder_dies(tmp_path: Path) -> None:
    first = SlideLock(tmp_path, "s1")
    assert first.acquire()
    assert not SlideLock(tmp_path, "s1").acquire()  # even in one process (separate open files)
    assert SlideLock(tmp_path, "s2").acquire()
    first.release()
    lock_file = tmp_path / ".locks" / "s1.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         f"fd = os.open({str(lock_file)!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert not SlideLock(tmp_path, "s1").acquire()
    finally:
        holder.kill()  # a crash: nobody releases the lock
        holder.wait()
    again = SlideLock(tmp_path, "s1")
    assert again.acquire()  # the kernel dropped the dead holder's lock
    assert lock_file.read_text().strip() == str(os.getpid())
    again.release()


def test_ensure_writable_dir(tmp_path: Path) -> None:
    assert ensure_writable_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the probe is gone
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="not writable") as info:
        ensure_writable_dir(blocker / "out")
    assert str(blocker / "out") in str(info.value)


# Messages as h5py 3.16 raises them (RuntimeError from a flush, OSError from an open).
H5_EFBIG = RuntimeError(
    "Unable to synchronously flush file (file write failed: time = Wed Nov 25 21:30:09 2026\n, filename = "
    "'/x/f.h5', file descriptor = 3, errno = 27, error message = 'File too large', buf = 0x1, total write "
    "size = 952704, bytes this sub-write = 952704, offset = 100000)"
)
H5_ENOSPC = OSError("Can't write data (file write failed: ..., errno = 28, error message = 'No space left on device')")
H5_NOLOCK = OSError("Unable to synchronously open file (unable to lock file, errno = 37, error message = 'No locks available')")
H5_BUSY = OSError("Unable to open file (unable to lock file, errno = 11, error message = 'Resource temporarily unavailable')")


def test_errors_are_recognised_from_their_errno_or_their_text(tmp_path: Path) -> None:
    assert error_errno(H5_EFBIG) == errno.EFBIG and error_errno(OSError(errno.ENOSPC, "full")) == errno.ENOSPC
    assert is_disk_error(H5_EFBIG) and is_disk_error(H5_ENOSPC) and is_disk_error(OSError(errno.EROFS, "ro"))
    assert not is_disk_error(H5_NOLOCK) and not is_disk_error(ValueError("errno = 28"))
    assert is_lock_error(H5_NOLOCK) and not is_lock_error(H5_BUSY) and not is_lock_error(H5_EFBIG)
    msg = str(as_output_error(H5_EFBIG, tmp_path))
    assert "File too large" in msg and str(tmp_path) in msg
    msg = str(as_output_error(H5_ENOSPC, tmp_path))
    assert "No space left" in msg and str(tmp_path) in msg
    msg = str(as_output_error(H5_NOLOCK, tmp_path))
    assert HDF5_LOCK_HINT in msg and "HDF5_USE_FILE_LOCKING=FALSE" in msg
    assert "permissions" in str(as_output_error(OSError(errno.EACCES, "Permission denied"), tmp_path))


def test_readers_say_which_version_wrote_a_file_they_cannot_read(tmp_path):
    import h5py
    import numpy as np

    from wsi_mil.errors import BagFileError
    from wsi_mil.store.bag_file import read_bag_attrs
    from wsi_mil.store.coords_file import COORDS_FORMAT_VERSION, read_coords_h5
    from wsi_mil.store.heatmap_file import read_heatmap_h5
    from wsi_mil.store.score_file import load_scores

    newer = tmp_path / "coords.h5"
    with h5py.File(newer, "w") as fh:
        fh.create_dataset("coords", data=np.zeros((1, 2), np.int64))
        fh.attrs.update({"complete": True, "format_version": COORDS_FORMAT_VERSION + 1})
    with pytest.raises(BagFileError, match=f"format {COORDS_FORMAT_VERSION + 1}, written by a newer wsi-mil"):
        read_coords_h5(newer)
    for name, read in (("scores.h5", load_scores), ("heatmap.h5", read_heatmap_h5), ("bag.h5", read_bag_attrs)):
        old = tmp_path / name
        with h5py.File(old, "w") as fh:
            fh.create_dataset("something_else", data=np.zeros(3))
            fh.attrs["wsi_mil_version"] = "0.0.9"
        with pytest.raises(BagFileError, match=r"written by wsi-mil 0\.0\.9; this is wsi-mil"):
            read(old)
        foreign = tmp_path / f"foreign_{name}"
        with h5py.File(foreign, "w") as fh:
            fh.create_dataset("something_else", data=np.zeros(3))
        with pytest.raises(BagFileError, match="no wsi-mil version recorded"):
            read(foreign)


def test_a_lock_failure_other_than_held_is_an_output_error_naming_the_folder(tmp_path: Path, monkeypatch) -> None:
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(OutputError, match=r"refused a slide claim .*No locks available.*-o flock") as info:
        SlideLock(tmp_path / "out", "s1").acquire()
    assert str(tmp_path / "out") in str(info.value)


def test_the_record_is_on_disk_before_the_claim_is_released(tmp_path: Path, monkeypatch) -> None:
    """A crash between writing the record and releasing the claim must not lose the record: the record
    is written first (checked at the moment of release)."""
    from wsi_mil.runs.slide_loop import run_batch
    from wsi_mil.store import RecordStore

    slides = []
    for name in ("a", "b"):
        p = tmp_path / f"{name}.svs"
        p.write_bytes(b"x")
        slides.append(p)
    seen_at_release: list[bool] = []
    real_release = SlideLock.release

    def release(self):
        if self.held:
            slide_id = self.path.stem
            seen_at_release.append(RecordStore(tmp_path / "out", ["slide_id"]).read(slide_id) is not None)
        real_release(self)

    monkeypatch.setattr(SlideLock, "release", release)
    summary = run_batch(slides, tmp_path / "out", lambda p: {"status": "done"}, ["slide_id", "status"], progress=False)
    assert [r["status"] for r in summary.records] == ["done", "done"]
    assert seen_at_release == [True, True]

    # and a process that dies right there (injected: os._exit in the release) leaves its record behind
    crash = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from wsi_mil.runs.slide_loop import run_batch\n"
        "from wsi_mil.store import SlideLock\n"
        "SlideLock.release = lambda self: os._exit(17) if self.held else None\n"
        "run_batch([Path(sys.argv[1])], Path(sys.argv[2]), lambda p: {'status': 'done'}, ['slide_id', 'status'], progress=False)\n"
    )
    slide = tmp_path / "c.svs"
    slide.write_bytes(b"x")
    died = subprocess.run([sys.executable, "-c", crash, str(slide), str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert died.returncode == 17, died.stderr
    assert (RecordStore(tmp_path / "out", ["slide_id"]).read("c") or {}).get("status") == "done"
    claim = SlideLock(tmp_path / "out", "c")
    assert claim.acquire()  # the kernel dropped the dead process's claim
    claim.release()

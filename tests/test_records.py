"""Per-slide records and the manifest: updates merge only what changed and always equal a full rebuild,
also with two processes on one folder and with a process SIGKILLed before its end-of-run update."""

from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from wsi_mil.store import records as records_module
from wsi_mil.store.records import MERGED_STAMP, RecordStore

COLUMNS = ("slide_id", "path", "status", "error", "n_tiles", "seconds", "flag")


def _record(slide_id: str, i: int) -> dict[str, Any]:
    """Values of every kind a manifest cell must keep: floats (4 digits), None, quotes, commas, newlines, unicode."""
    return {
        "slide_id": slide_id,
        "path": f"/data/slides/é {slide_id}.svs",
        "status": ("done", "failed", "no_tissue")[i % 3],
        "error": None if i % 3 == 0 else f'broken, "tile" at ({i}, {i})\nsecond line',
        "n_tiles": i * 7,
        "seconds": 1.0 / (i + 3),
        "flag": i % 2 == 0,
        "not_a_column": [i],
    }


def _full_rebuild(out: Path) -> str:
    return RecordStore(out, COLUMNS).manifest_text()


def _manifest(out: Path) -> str:
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        return fh.read()


def _count_record_reads(monkeypatch) -> list[Path]:
    reads: list[Path] = []
    real = records_module._read_record

    def spy(path: Path, warn: bool = False):
        reads.append(path)
        return real(path, warn)

    monkeypatch.setattr(records_module, "_read_record", spy)
    return reads


def test_an_update_reads_only_the_records_written_since_the_last_one_and_equals_a_full_rebuild(tmp_path, monkeypatch):
    out = tmp_path / "out"
    store = RecordStore(out, COLUMNS)
    for i in range(300):
        store.write(_record(f"s{i:04d}", i))
    store.write_manifest()
    assert _manifest(out) == _full_rebuild(out)
    assert _manifest(out).count("\n") > 300  # quoted newlines inside cells too
    assert not list((out / ".records" / "changed").iterdir())  # every marker merged

    reads = _count_record_reads(monkeypatch)
    store.write_manifest()  # nothing changed: not a single record is read
    assert reads == []
    other = RecordStore(out, COLUMNS)  # another process's store on the same folder
    other.write(_record("s0007", 1000))  # changed
    other.write(_record("s9999", 5))  # new, sorts last
    other.write(_record("a0000", 4))  # new, sorts first
    other.write(_record("s0010", 6))
    (out / ".records" / "s0010.json").unlink()  # written, then removed: its row goes, as in a full rebuild
    other.write(_record("s0011", 7))
    (out / ".records" / "s0011.json").write_text("{not json")  # unreadable: left out, as in a full rebuild
    store.write_manifest()
    assert sorted(p.name for p in reads) == ["a0000.json", "s0007.json", "s0010.json", "s0011.json", "s9999.json"]
    monkeypatch.undo()
    assert _manifest(out) == _full_rebuild(out)
    rows = _manifest(out)
    assert "s0010," not in rows and "s0011," not in rows and rows.index("a0000") < rows.index("s0001")
    assert '"broken, ""tile"" at (1000, 1000)\nsecond line"' in rows and ",0.000997," in rows


def test_the_manifest_is_rebuilt_from_every_record_when_it_cannot_be_trusted(tmp_path, monkeypatch):
    out = tmp_path / "out"
    store = RecordStore(out, COLUMNS)
    for i in range(20):
        store.write(_record(f"s{i:02d}", i))
    store.write_manifest()
    # a record left by a wsi-mil that kept no markers, in a folder without the merge stamp
    (out / ".records" / "legacy.json").write_text(json.dumps(_record("legacy", 2)))
    (out / ".records" / MERGED_STAMP).unlink()
    killed_writer = out / ".records" / ".tmp-s03.json.123.0badcafe.json"  # a record never renamed into place
    killed_writer.write_text(json.dumps(_record("s03", 99)))
    assert ",693," not in _full_rebuild(out)  # a temp file is no record (n_tiles 99 * 7)
    store.write_manifest()
    assert "legacy," in _manifest(out) and _manifest(out) == _full_rebuild(out)
    assert not killed_writer.exists()  # removed by the full rebuild, under the exclusive lock
    assert (out / ".records" / MERGED_STAMP).is_file()

    reads = _count_record_reads(monkeypatch)
    for damage in ("missing", "garbage", "other columns", "duplicate row"):
        path = out / "manifest.csv"
        if damage == "missing":
            path.unlink()
        elif damage == "garbage":
            path.write_bytes(b"\xff\xfe\x00 not a manifest")
        elif damage == "other columns":
            path.write_text("slide_id,status\r\ns00,done\r\n")
        else:
            data = path.read_bytes()
            path.write_bytes(data + data.split(b"\r\n", 1)[1])
        store.write(_record("s05", 50))  # with a change, so the manifest's rows are read too
        reads.clear()
        store.write_manifest()
        assert len(reads) == 21, damage  # every record: a full rebuild
        assert _manifest(out) == _full_rebuild(out), damage
    (out / "manifest.csv").unlink()  # also without any change
    store.write_manifest()
    assert _manifest(out) == _full_rebuild(out)
    # a command with other columns rebuilds the manifest with its own
    narrow = RecordStore(out, ("slide_id", "status"))
    narrow.write_manifest()
    assert _manifest(out).splitlines()[0] == "slide_id,status" and _manifest(out) == narrow.manifest_text()
    # the library's full rebuild, also under another name
    assert store.rebuild_manifest("other.csv").read_bytes().decode("utf-8") == _full_rebuild(out)


def test_a_record_write_holds_the_manifest_lock_shared_and_marks_the_slide_before_replacing_its_record(tmp_path, monkeypatch):
    """So an update never falls between a marker and its record, and a process killed in between leaves a marker."""
    out = tmp_path / "out"
    store = RecordStore(out, COLUMNS)
    store.write_manifest()
    seen: list[tuple[bool, bool]] = []
    real = records_module.atomic_write_json

    def spy(path, obj):
        marked = (out / ".records" / "changed" / obj["slide_id"]).is_file()
        fd = os.open(out / ".locks" / "manifest.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            exclusive_free = True
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as exc:
            assert exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
            exclusive_free = False
        fd2 = os.open(out / ".locks" / "manifest.lock", os.O_RDWR)
        try:
            fcntl.flock(fd2, fcntl.LOCK_SH | fcntl.LOCK_NB)  # other writers are not held up
            fcntl.flock(fd2, fcntl.LOCK_UN)
        finally:
            os.close(fd2)
            os.close(fd)
        seen.append((marked, exclusive_free))
        return real(path, obj)

    monkeypatch.setattr(records_module, "atomic_write_json", spy)
    store.write(_record("a", 1))
    assert seen == [(True, False)]


def _interleave(out: str, worker: int, seed: int) -> None:
    import random

    rng = random.Random(seed)
    store = RecordStore(Path(out), COLUMNS)
    for i in range(150):
        slide_id = f"s{rng.randrange(40):02d}" if rng.random() < 0.7 else f"w{worker}_{i:03d}"
        store.write(_record(slide_id, worker * 1000 + i))
        if rng.random() < 0.1:
            store.write_manifest()


def test_two_processes_writing_and_updating_one_folder_give_the_full_rebuild(tmp_path):
    out = tmp_path / "out"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_interleave, args=(str(out), w, 100 + w)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    RecordStore(out, COLUMNS).write_manifest()
    text = _manifest(out)
    assert text == _full_rebuild(out)
    ids = {p.stem for p in (out / ".records").glob("*.json")}
    assert len(ids) > 100 and all(f"\r\n{s}," in text for s in ids)


def _write_forever(out: str) -> None:
    store = RecordStore(Path(out), COLUMNS)
    i = 0
    while True:
        store.write(_record(f"k{i % 500:03d}", i))
        i += 1
        if i % 97 == 0:
            store.write_manifest()


def test_records_of_a_process_killed_at_any_point_reach_the_next_update_by_anyone(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        proc = ctx.Process(target=_write_forever, args=(str(out),))
        proc.start()
        deadline = time.monotonic() + 60
        while len(list((out / ".records").glob("*.json"))) < 150 + 100 * attempt and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        RecordStore(out, COLUMNS).write_manifest()  # another process's update
        assert _manifest(out) == _full_rebuild(out)
        assert len(_manifest(out).split("\r\n")) > 150


def _batch_killed_on_the_fourth_slide(slides: list[str], out: str) -> None:
    from wsi_mil.runs.slide_loop import run_batch

    def process(path: Path) -> dict[str, Any]:
        if path.stem == "c3":
            os.kill(os.getpid(), signal.SIGKILL)
        return {"status": "done", "n_tiles": 3}

    run_batch([Path(s) for s in slides], Path(out), process, COLUMNS, progress=False)


def test_a_batch_killed_before_its_manifest_update_is_in_the_next_batch_manifest(tmp_path):
    from wsi_mil.runs.slide_loop import run_batch

    slides = []
    for name in ("c0", "c1", "c2", "c3", "c4", "d0", "d1"):
        p = tmp_path / "in" / f"{name}.svs"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x")
        slides.append(p)
    out = tmp_path / "out"
    proc = multiprocessing.get_context("fork").Process(
        target=_batch_killed_on_the_fourth_slide, args=([str(s) for s in slides[:5]], str(out))
    )
    proc.start()
    proc.join(120)
    assert proc.exitcode == -signal.SIGKILL
    assert not (out / "manifest.csv").exists()
    summary = run_batch(slides[5:], out, lambda p: {"status": "done", "n_tiles": 5}, COLUMNS, progress=False)
    assert [r["status"] for r in summary.records] == ["done", "done"]
    text = _manifest(out)
    assert text == _full_rebuild(out)
    assert [line.split(",")[0] for line in text.split("\r\n")[1:-1]] == ["c0", "c1", "c2", "d0", "d1"]


@pytest.mark.parametrize("shared", [True, False])
def test_a_refused_folder_lock_is_an_output_error_naming_the_folder(tmp_path, monkeypatch, shared):
    from wsi_mil.errors import OutputError
    from wsi_mil.store.locks import folder_lock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(OutputError, match=r"refused the manifest lock \(flock: No locks available.*-o flock.*--no-claims") as info:
        with folder_lock(tmp_path / "out", "manifest", shared=shared):
            pass
    assert str(tmp_path / "out") in str(info.value)

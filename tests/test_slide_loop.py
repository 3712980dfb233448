"""The batch runner: discovery and duplicate ids (R21), sharding, one failure never stops the batch."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from wsi_mil.errors import DuplicateSlideIdError, InputError, NoTissueError, OutputError, SlideOpenError
from wsi_mil.runs.slide_loop import (
    check_unique_ids,
    discover_slides,
    parse_shard,
    run_batch,
    select_shard,
    shard_of,
)
from wsi_mil.store import SlideLock

COLUMNS = ("slide_id", "path", "status", "error_class", "error", "n_tiles", "seconds")


def _files(root: Path, *names: str) -> list[Path]:
    out = []
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
        out.append(p)
    return out


def test_discovery_from_folders_globs_and_csv(tmp_path: Path) -> None:
    a, b, c = _files(tmp_path / "in", "a.svs", "deep/er/b.TIF", "c.ndpi")
    _files(tmp_path / "in", "notes.txt", "d.h5")
    assert discover_slides(tmp_path / "in") == [a, c, b]  # sorted by path, known suffixes only
    assert discover_slides(str(tmp_path / "in" / "*.svs")) == [a]
    listing = tmp_path / "list.csv"
    listing.write_text("\ufeff path ,label\nin/a.svs,1\n" + f"{c},0\n", encoding="utf-8")
    assert discover_slides(listing) == [a, c]
    with pytest.raises(InputError, match="No slides found"):
        discover_slides(tmp_path / "nothing-*.svs")


def test_R21_duplicate_ids_are_refused_naming_every_file(tmp_path: Path) -> None:
    paths = _files(tmp_path, "a/x.svs", "b/x.svs", "x.tif", "y.svs")
    with pytest.raises(DuplicateSlideIdError) as info:
        discover_slides(tmp_path)
    msg = str(info.value)
    assert all(str(p) in msg for p in paths[:3]) and "y.svs" not in msg
    check_unique_ids(paths[2:])  # no error


def test_parse_shard_from_flags_and_schedulers() -> None:
    assert parse_shard("2/5", env={}) == (2, 5)
    assert parse_shard(None, env={}) == (0, 1)
    assert parse_shard(None, env={"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}) == (3, 4)
    assert parse_shard(None, env={"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "8"}) == (4, 8)
    assert parse_shard(None, env={"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "9", "WSI_MIL_SHARDS": "2"}) == (1, 2)
    assert parse_shard(None, env={"JOB_COMPLETION_INDEX": "2", "WSI_MIL_SHARDS": "3"}) == (2, 3)
    assert parse_shard("1/2", env={"JOB_COMPLETION_INDEX": "0", "WSI_MIL_SHARDS": "3"}) == (1, 2)  # the flag wins
    for bad in ("3/3", "-1/2", "a/b", "1"):
        with pytest.raises(InputError):
            parse_shard(bad, env={})
    with pytest.raises(InputError, match="WSI_MIL_SHARDS"):
        parse_shard(None, env={"JOB_COMPLETION_INDEX": "0"})


def test_shards_partition_deterministically_by_id() -> None:
    paths = [Path(f"/data/{d}/slide_{i:03d}.svs") for i, d in zip(range(60), "abc" * 20, strict=True)]
    shards = [select_shard(paths, i, 4) for i in range(4)]
    assert sorted(p for s in shards for p in s) == sorted(paths)  # a partition: every slide once
    assert all(len(s) > 5 for s in shards)
    assert select_shard(list(reversed(paths)), 1, 4) == list(reversed(shards[1]))  # not by position
    assert [shard_of(p.stem, 4) for p in paths[:8]] == [shard_of(p.stem, 4) for p in paths[:8]]
    # fixed values: the same in every process (no dependence on PYTHONHASHSEED) and every release
    assert [shard_of(s, 3) for s in ("case001_A", "case001_B", "x", "Schnitt 1 – ß")] == [0, 2, 0, 0]


# --- run_batch -------------------------------------------------------------------------------------------
def _process(outcomes: dict[str, Any], calls: list[str]) -> Any:
    def process(path: Path) -> dict[str, Any]:
        calls.append(path.stem)
        outcome = outcomes.get(path.stem, "done")
        if isinstance(outcome, BaseException):
            raise outcome
        return {"status": outcome, "n_tiles": 3}

    return process


def test_one_failing_slide_is_recorded_and_the_batch_goes_on(tmp_path: Path) -> None:
    paths = _files(tmp_path / "in", "a.svs", "b.svs", "c.svs", "d.svs")
    calls: list[str] = []
    outcomes = {"b": SlideOpenError("b is broken: copy it again"), "c": ZeroDivisionError("a bug")}
    summary = run_batch(paths, tmp_path / "out", _process(outcomes, calls), COLUMNS)
    assert calls == ["a", "b", "c", "d"]
    status = {r["slide_id"]: (r["status"], r.get("error_class")) for r in summary.records}
    assert status == {"a": ("done", None), "b": ("failed", "SlideOpenError"), "c": ("failed", "ZeroDivisionError"), "d": ("done", None)}
    assert summary.exit_code == 1 and "FAILED b: SlideOpenError: b is broken" in summary.text()
    manifest = (tmp_path / "out" / "manifest.csv").read_text()
    assert "b is broken: copy it again" in manifest and manifest.count("\n") == 5


def test_output_errors_stop_the_batch(tmp_path: Path) -> None:
    paths = _files(tmp_path / "in", "a.svs", "b.svs", "c.svs")
    calls: list[str] = []
    with pytest.raises(OutputError):
        run_batch(paths, tmp_path / "out", _process({"b": OutputError("disk full")}, calls), COLUMNS)
    assert calls == ["a", "b"]
    assert "disk full" in (tmp_path / "out" / "manifest.csv").read_text()


def test_interrupt_is_recorded_and_gives_130(tmp_path: Path) -> None:
    paths = _files(tmp_path / "in", "a.svs", "b.svs", "c.svs")
    calls: list[str] = []
    summary = run_batch(paths, tmp_path / "out", _process({"b": KeyboardInterrupt()}, calls), COLUMNS)
    assert calls == ["a", "b"] and summary.interrupted and summary.exit_code == 130
    assert [r["status"] for r in summary.records] == ["done", "interrupted"]
    assert "b.svs,interrupted" in (tmp_path / "out" / "manifest.csv").read_text()


def test_a_slide_locked_by_another_process_is_left_to_it(tmp_path: Path) -> None:
    paths = _files(tmp_path / "in", "a.svs", "b.svs")
    other = SlideLock(tmp_path / "out", "b")
    assert other.acquire()
    calls: list[str] = []
    summary = run_batch(paths, tmp_path / "out", _process({}, calls), COLUMNS)
    other.release()
    assert calls == ["a"] and summary.exit_code == 0
    assert [r["status"] for r in summary.records] == ["done", "locked"]
    assert "b.svs" not in (tmp_path / "out" / "manifest.csv").read_text()  # its owner writes its row


def test_no_tissue_is_not_retried_with_the_same_config_and_file(tmp_path: Path) -> None:
    paths = _files(tmp_path / "in", "a.svs", "blank.svs", "bad.svs")
    out = tmp_path / "out"
    outcomes: dict[str, Any] = {"blank": NoTissueError("blank: no tissue found"), "bad": SlideOpenError("bad")}
    calls: list[str] = []
    summary = run_batch(paths, out, _process(outcomes, calls), COLUMNS, config_hash="h1")
    assert summary.exit_code == 1 and summary.counts == {"done": 1, "no_tissue": 1, "failed": 1}

    calls.clear()
    summary = run_batch(paths, out, _process(outcomes, calls), COLUMNS, config_hash="h1")
    assert calls == ["a", "bad"]  # failures are retried, no_tissue is not
    blank = next(r for r in summary.records if r["slide_id"] == "blank")
    assert blank["status"] == "no_tissue" and blank["error"] == "blank: no tissue found" and blank["n_tiles"] == 0

    for kwargs in ({"config_hash": "h2"}, {"config_hash": "h1", "redo": True}):
        calls.clear()
        run_batch(paths, out, _process(outcomes, calls), COLUMNS, **kwargs)
        assert "blank" in calls
    run_batch(paths, out, _process(outcomes, calls), COLUMNS, config_hash="h1")
    calls.clear()
    time.sleep(0.01)
    paths[1].write_bytes(b"a new scan of the same slide")
    os.utime(paths[1])
    run_batch(paths, out, _process(outcomes, calls), COLUMNS, config_hash="h1")
    assert "blank" in calls  # the file changed: look again


def test_skipped_slides_keep_their_figures_in_the_manifest(tmp_path: Path) -> None:
    paths = _files(tmp_path / "in", "a.svs")
    out = tmp_path / "out"
    run_batch(paths, out, _process({}, []), COLUMNS)
    summary = run_batch(paths, out, _process({}, []), COLUMNS, is_done=lambda p: True)
    assert summary.records[0]["status"] == "skipped" and summary.records[0]["n_tiles"] == 3
    assert "a.svs,skipped,,,3," in (out / "manifest.csv").read_text()

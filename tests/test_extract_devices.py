"""``wsi-mil extract --devices`` (one process per device, simulated with ``cpu,cpu``), ``--no-claims``,
and shared-storage safety: a file system that refuses ``flock`` (ENOLCK), temp files of a slide
another process holds, processes that crash or are interrupted (R13)."""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from extract_helpers import (
    FAST_ARGS,
    assert_same_features,
    fast_config,
    manifest,
    read_h5,
    start_cli,
    temp_files,
    wait_for,
)

from wsi_mil.cli.main import main
from wsi_mil.config import ExtractConfig, extract_config_hash, load_config
from wsi_mil.errors import ConfigError, OutputConflictError
from wsi_mil.runs.devices import device_labels, extract_on_devices, resolve_devices, share_workers
from wsi_mil.runs.extract import EXTRACT_COLUMNS, run_extract
from wsi_mil.runs.slide_loop import part_of, run_file_name, select_shard, shard_of
from wsi_mil.store import RecordStore, SlideLock, temp_name

pytest_plugins = ("extract_fixtures",)  # cohort, reference, one_torch_thread
pytestmark = pytest.mark.usefixtures("one_torch_thread")

DEVICES = ("--devices", "cpu,cpu")
#: FAST_ARGS without --device (``--devices`` replaces it)
ARGS = tuple(a for i, a in enumerate(FAST_ARGS) if a != "--device" and FAST_ARGS[i - 1] != "--device")
TEMP = re.compile(r"\.tmp-(?P<slide>.+)\.h5\.(?P<pid>\d+)\.[0-9a-f]{8}")


def _run_all(*commands: tuple[str, ...], timeout: float = 300) -> list[subprocess.CompletedProcess[str]]:
    """Start every command at once (each its own interpreter); wait for all."""
    procs = [start_cli(*c) for c in commands]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(procs, outputs, strict=True)]


def _kill_session(proc: subprocess.Popen[str]) -> None:
    """Kill what is left of a command's session (after a failure, or a loader process still exiting)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


# --- parts, names, devices -------------------------------------------------------------------------------
@pytest.mark.parametrize("n_shards", [1, 3])
@pytest.mark.parametrize("n_parts", [2, 4])
def test_device_parts_split_each_shard_disjointly_and_completely(n_shards: int, n_parts: int) -> None:
    paths = [Path(f"slide_{i:03d}.svs") for i in range(240)]
    for index in range(n_shards):
        shard = select_shard(paths, index, n_shards)
        parts = [select_shard(paths, index, n_shards, (k, n_parts)) for k in range(n_parts)]
        assert sorted(p for part in parts for p in part) == sorted(shard)  # disjoint and complete
        assert all(len(part) >= len(shard) / n_parts / 2 for part in parts)  # about equal, whatever N is
        assert all(shard_of(p.stem, n_shards) == index for part in parts for p in part)
    assert {part_of(p.stem, n_shards, 1) for p in paths} == {0}
    names = {run_file_name((i, n_shards), (k, n_parts)) for i in range(n_shards) for k in range(n_parts)}
    names |= {run_file_name((i, n_shards)) for i in range(n_shards)}
    assert len(names) == n_shards * (n_parts + 1)  # no two processes write one run file


def test_devices_option_config_and_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    cfg = load_config(ExtractConfig, None, {"devices": "cpu, cpu"})
    assert cfg.devices == ["cpu", "cpu"]
    assert load_config(ExtractConfig, None, {"devices": "all"}).devices == "all"
    assert extract_config_hash(cfg) == extract_config_hash(ExtractConfig())  # where it ran is not in the hash
    for bad, message in [
        ("cuda", r"\['cuda'\] not understood.*cuda:N"),
        ("cpu,cuda:0", "mix CPU and CUDA"),
        ("", "not understood"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(ExtractConfig, None, {"devices": bad})
    with pytest.raises(ConfigError, match="both given"):
        load_config(ExtractConfig, None, {"devices": "cpu,cpu", "device": "cpu"})

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match=r"--devices all: no CUDA device is visible .*CUDA_VISIBLE_DEVICES=''.*cpu,cpu"):
        resolve_devices("all")
    with pytest.raises(ConfigError, match="cuda:1 not visible"):
        resolve_devices(["cuda:0", "cuda:1"])
    assert resolve_devices(["cpu", "cpu"]) == ["cpu", "cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert resolve_devices("all") == ["cuda:0", "cuda:1", "cuda:2"]

    assert device_labels(["cpu", "cpu"]) == ["cpu#0", "cpu#1"]
    assert device_labels(["cuda:0", "cuda:1"]) == ["cuda:0", "cuda:1"]
    assert [share_workers(w, 2, "cuda") for w in (0, 1, 8)] == [0, 1, 4]
    assert share_workers(-1, 2, "cpu") == -1  # a reading thread each
    monkeypatch.setattr("wsi_mil.features.runtime.available_cpus", lambda: 16)
    assert share_workers(-1, 2, "cuda") == 7  # the CPUs left after one per process, split


def test_run_extract_refuses_a_device_list_it_would_ignore(cohort: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="extract_on_devices"):
        run_extract(cohort, tmp_path / "out", fast_config(devices="cpu,cpu", device="auto"), progress=False)


# --- processes on one folder -----------------------------------------------------------------------------
def _done(stdout: str) -> int:
    match = re.search(r"slide\(s\) in [\d.]+ s: (.*)", stdout)
    assert match, stdout
    counts = dict((s, int(n)) for n, s in (part.split(" ") for part in match.group(1).split(", ")))
    return counts.get("done", 0)


def test_two_processes_with_devices_on_one_folder_do_each_slide_once(
    cohort: list[Path], reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ("extract", *map(str, cohort), "--out", str(out), *ARGS, *DEVICES)
    procs = _run_all(args, args)
    assert [p.returncode for p in procs] == [0, 0], [p.stderr for p in procs]
    ids = sorted(p.stem for p in cohort)
    assert sum(_done(p.stdout) for p in procs) == len(ids)  # each slide computed exactly once
    assert sorted(p.stem for p in (out / "features").glob("*.h5")) == ids
    assert_same_features(reference, out, ids)  # features do not depend on the process or device
    assert {read_h5(out / "features" / f"{i}.h5")[2]["config_hash"] for i in ids} == {
        read_h5(reference / "features" / f"{ids[0]}.h5")[2]["config_hash"]
    }
    assert temp_files(out / "features") == []
    assert {r["status"] for r in manifest(out).values()} <= {"done", "skipped"}  # skipped: done by the other run
    assert yaml.safe_load((out / "config.yaml").read_text())["devices"] == ["cpu", "cpu"]
    assert sorted(p.name for p in out.glob("run*.json")) == ["run.device-0-of-2.json", "run.device-1-of-2.json", "run.json"]
    run = json.loads((out / "run.json").read_text())
    assert [p["part"] for p in run["processes"]] == [[0, 2], [1, 2]] and run["crashed"] == []
    # each process logged as the parent does, saying which device it is
    assert re.search(r"INFO wsi_mil\.runs\.extract: \[cpu#0\] encoder", procs[0].stderr)
    assert re.search(r"INFO wsi_mil\.runs\.extract: \[cpu#1\] encoder", procs[0].stderr)


def _freeze_a_writer(proc: subprocess.Popen[str], features: Path) -> tuple[int, str]:
    """Stop (SIGSTOP) the device process that is writing a bag; its pid and slide id."""
    while wait_for(lambda: temp_files(features), 120, proc):
        for tmp in temp_files(features):
            found = TEMP.fullmatch(tmp.name)
            if found is None:
                continue
            pid = int(found["pid"])
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                continue
            assert wait_for(lambda: _state(pid) in ("T", "t"), 10), "the process did not stop"
            if tmp.exists():
                return pid, found["slide"]
            os.kill(pid, signal.SIGCONT)  # it had finished that slide: try again
    raise AssertionError(f"no bag was being written: {proc.communicate()}")


def _pending(pid: int, sig: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("ShdPnd:", "SigPnd:"))]
    return any(mask & (1 << (sig - 1)) for mask in masks)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_ctrl_c_stops_every_device_process_and_exits_130(cohort: list[Path], tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the parent alone, as ``kill -INT``): the parent passes it on to each process,
    which records its slide as interrupted and removes its temp file; exit code 130."""
    out = tmp_path / "out"
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # see test_extract_faults: sigint_not_ignored
    try:
        proc = start_cli("extract", *map(str, cohort), "--out", str(out), *ARGS, *DEVICES, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        pid, slide = _freeze_a_writer(proc, out / "features")
        os.kill(proc.pid, signal.SIGINT)
        assert wait_for(lambda: _pending(pid, signal.SIGINT), 60), "the parent did not pass Ctrl-C on"
        os.kill(pid, signal.SIGCONT)
        proc.wait(timeout=120)
    finally:
        _kill_session(proc)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "interrupted: rerun the same command to resume" in stdout
    # The frozen process was writing this slide's bag. It stops inside it (interrupted), unless it was frozen
    # at the very end of the write: then the rename comes before the signal is handled (done, the bag in place).
    status = manifest(out)[slide]["status"]
    assert status == "interrupted" or (status == "done" and (out / "features" / f"{slide}.h5").is_file()), status
    assert temp_files(out / "features") == []
    run = json.loads((out / "run.json").read_text())
    assert run["interrupted"] is True and run["crashed"] == []
    assert all(_state(p["pid"]) == "gone" for p in run["processes"])  # the parent waited for each


def test_a_crashed_device_process_is_reported_and_a_rerun_completes(
    cohort: list[Path], reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc = start_cli(
        "extract", *map(str, cohort), "--out", str(out), *ARGS, *DEVICES, "--allow-failed-slides", start_new_session=True
    )
    try:
        pid, slide = _freeze_a_writer(proc, out / "features")
        os.kill(pid, signal.SIGKILL)  # like the OOM killer
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        _kill_session(proc)
    assert proc.returncode == 1, stderr  # not 0, although --allow-failed-slides
    label = re.search(rf"(cpu#\d): process {pid}", stderr)
    assert label, stderr
    assert re.search(rf"CRASHED {label[1]} \(process {pid}\) ended \(signal SIGKILL\) before reporting", stdout)
    assert re.search(rf"FAILED {slide}: ProcessCrashError: the process on {label[1]} ended", stdout)
    assert "ended without reporting their slides" in stderr
    run = json.loads((out / "run.json").read_text())
    assert len(run["crashed"]) == 1

    summary = run_extract(cohort, out, fast_config(), progress=False)  # the rerun resumes
    assert summary.exit_code == 0, summary.text()
    assert slide in {r["slide_id"] for r in summary.records if r["status"] == "done"}
    assert temp_files(out / "features") == []  # the killed writer's temp file is removed by the new claim holder
    assert_same_features(reference, out, sorted(p.stem for p in cohort))


def test_no_claims_with_devices_takes_no_lock_and_does_every_slide(
    cohort: list[Path], reference: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``--no-claims`` with ``--devices``: the processes' parts are disjoint, so no lock is needed."""
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        summary = extract_on_devices(cohort, out, fast_config(devices="cpu,cpu", device="auto"), claims=False, progress=False)
    assert summary.exit_code == 0, summary.text()
    assert summary.counts == {"done": len(cohort)}
    assert not (out / ".locks").exists()  # not one lock file: nothing relies on flock
    assert_same_features(reference, out, sorted(p.stem for p in cohort))
    warnings = [r.getMessage() for r in caplog.records if "--no-claims" in r.getMessage()]
    assert sorted(w.split("]")[0] for w in warnings) == ["[cpu#0", "[cpu#1"]  # once per process, naming it
    assert json.loads((out / "run.json").read_text())["claims"] is False
    assert {r["status"] for r in manifest(out).values()} == {"done"}


def test_an_error_that_stops_every_process_stops_the_run_once(cohort: list[Path], reference: Path, tmp_path: Path) -> None:
    """Each process meets the same refusal (here: a folder made with another config, R25); the run
    raises it once, as a single process would, after every process has ended."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = _fingerprint(out)
    cfg = fast_config(devices="cpu,cpu", device="auto", feature_dtype="float16")
    with pytest.raises(OutputConflictError, match=r"another configuration \(feature_dtype: 'float32' -> 'float16'\)"):
        extract_on_devices(cohort, out, cfg, progress=False)
    assert _fingerprint(out) == before


# --- shared storage -------------------------------------------------------------------------------------
def _fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".locks" not in p.parts and p.name != "config.yaml"
    }


@pytest.mark.parametrize("which", ["every lock", "slide claims"])
def test_enolck_stops_the_run_with_the_output_error_and_loses_nothing(
    cohort: list[Path], reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    """A file system without flock (NFS mounted nolock, Lustre without -o flock): ENOLCK from the lock call."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "features" / "s02.h5").unlink()  # work left to do
    (out / ".records" / "s02.json").unlink()
    RecordStore(out, EXTRACT_COLUMNS).rebuild_manifest()  # a record removed by hand: only a full rebuild sees it
    before = _fingerprint(out)
    real_flock = fcntl.flock

    def no_locks(fd: int, op: int) -> None:
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        if which == "every lock" or name not in ("config.lock", "manifest.lock"):
            raise OSError(errno.ENOLCK, "No locks available")
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", no_locks)
    result = CliRunner().invoke(main, ["-q", "extract", *map(str, cohort), "--out", str(out), *FAST_ARGS])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert message.startswith("error: OutputError: The file system of")
    assert str(out) in message and "No locks available" in message
    assert "-o flock" in message and "--no-claims" in message  # both remedies
    assert _fingerprint(out) == before  # bags, records, QC files and the manifest untouched
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        assert {row["slide_id"]: row["status"] for row in csv.DictReader(fh)} == {
            p.stem: "done" for p in cohort if p.stem != "s02"
        }


@pytest.mark.parametrize("claims", [True, False], ids=["claims", "no-claims, disjoint shards"])
def test_a_process_never_removes_the_temp_file_of_a_slide_it_does_not_hold(
    cohort: list[Path], tmp_path: Path, claims: bool
) -> None:
    """Process A holds slide X (its claim, or under --no-claims its shard) and is writing X's temp file
    while process B runs over the same folder: B removes stale temp files of its own slides only."""
    out = tmp_path / "out"
    x = next(p.stem for p in cohort if shard_of(p.stem, 2) == 0)
    mine = [p for p in cohort if shard_of(p.stem, 2) == 1]  # B's shard under --no-claims
    a_claim = SlideLock(out, x)
    assert a_claim.acquire()
    try:
        a_temp = temp_name(out / "features" / f"{x}.h5", ".h5")  # A writing X
        a_temp.parent.mkdir(parents=True)
        a_temp.write_bytes(b"A is writing this")
        stale = [temp_name(out / "features" / f"{mine[0].stem}.h5", ".h5"), temp_name(out / "tissue" / f"{mine[0].stem}.png", ".png")]
        for path in stale:  # left by a killed process: nobody holds that slide
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"partial")
        shard = (0, 1) if claims else (1, 2)
        summary = run_extract(cohort, out, fast_config(), claims=claims, shard=shard, progress=False)
        assert summary.exit_code == 0, summary.text()
        assert a_temp.read_bytes() == b"A is writing this"
        assert not any(p.exists() for p in stale)
        statuses = {r["slide_id"]: r["status"] for r in summary.records}
        assert statuses.get(x) == ("locked" if claims else None)
    finally:
        a_claim.release()

"""Run one per-slide function over many slides: one bad slide never stops the batch.

Shared by ``tiles``, ``extract`` and ``heatmap``: slide discovery (folder, glob, CSV, list), the
duplicate-id check, deterministic sharding, per-slide locks and records, the manifest, interruption
handling and the run summary. One module because each of these is a rule every batch command must apply
the same way (which slides, which process takes each, what a record and a signal mean); apart, a command
could take one rule and miss its neighbour.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import logging
import os
import signal
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_mil.errors import DuplicateSlideIdError, InputError, NoTissueError, OutputError, WsiMilError
from wsi_mil.slide import SLIDE_SUFFIXES
from wsi_mil.store import RecordStore, SlideLock, remove_stale_temp_files

logger = logging.getLogger(__name__)

#: statuses that count as success for the exit code
OK_STATUSES = ("done", "skipped", "no_tissue")


def discover_slides(inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Slides from folders (recursive, by known suffix), globs, CSV files (column ``path``) or files."""
    items = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    found: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found.extend(
                sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in SLIDE_SUFFIXES)
            )
        elif p.suffix.lower() == ".csv" and p.is_file():
            found.extend(_slides_from_csv(p))
        elif p.exists():
            found.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True))
            if not matches:
                raise InputError(f"No slides found at {item}: give a folder, a glob, a CSV with a 'path' column, or files.")
            found.extend(m for m in matches if m.is_file())
    if not found:
        raise InputError(f"No slide files found in {', '.join(map(str, items))} (suffixes: {', '.join(SLIDE_SUFFIXES)}).")
    check_unique_ids(found)
    return found


def _slides_from_csv(path: Path) -> list[Path]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in reader.fieldnames or []]
        if "path" not in cols:
            raise InputError(f"{path}: a slide list CSV needs a 'path' column; it has {cols}.")
        out = []
        for row in reader:
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            if row["path"]:
                q = Path(row["path"])
                out.append(q if q.is_absolute() else (path.parent / q))
        return out


def check_unique_ids(paths: Iterable[Path]) -> None:
    """Refuse two inputs with the same slide id (file stem) before anything is processed (R21)."""
    by_id: dict[str, list[str]] = {}
    for p in paths:
        by_id.setdefault(p.stem, []).append(str(p))
    dups = {k: v for k, v in by_id.items() if len(v) > 1}
    if dups:
        lines = "; ".join(f"'{k}': {', '.join(v)}" for k, v in sorted(dups.items()))
        raise DuplicateSlideIdError(
            f"{len(dups)} slide id(s) occur more than once (the id is the file name without suffix): {lines}. "
            "Rename the files or process the folders separately."
        )


def parse_shard(spec: str | None, env: dict[str, str] | None = None) -> tuple[int, int]:
    """``"I/N"`` (0-based I) or, when absent, Slurm array / Kubernetes indexed-job variables; else ``(0, 1)``.

    Slurm: ``SLURM_ARRAY_TASK_ID`` with ``SLURM_ARRAY_TASK_COUNT`` (the array must start at 0, or set
    ``SLURM_ARRAY_TASK_MIN``). Kubernetes: ``JOB_COMPLETION_INDEX`` with ``WSI_MIL_SHARDS`` (the
    completions count). ``WSI_MIL_SHARDS`` also overrides the Slurm count.
    """
    env = dict(os.environ) if env is None else env
    if spec:
        try:
            i_text, n_text = spec.split("/")
            index, count = int(i_text), int(n_text)
        except ValueError as exc:
            raise InputError(f"--shard must look like I/N (e.g. 0/4), got {spec!r}.") from exc
    elif "SLURM_ARRAY_TASK_ID" in env:
        index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        count = int(env.get("WSI_MIL_SHARDS") or env.get("SLURM_ARRAY_TASK_COUNT", "1"))
    elif "JOB_COMPLETION_INDEX" in env:
        index = int(env["JOB_COMPLETION_INDEX"])
        if "WSI_MIL_SHARDS" not in env:
            raise InputError("JOB_COMPLETION_INDEX is set: also set WSI_MIL_SHARDS to the job's completions count.")
        count = int(env["WSI_MIL_SHARDS"])
    else:
        return 0, 1
    if count < 1 or not 0 <= index < count:
        raise InputError(f"Invalid shard {index}/{count}: need 0 <= I < N.")
    return index, count


def _slide_hash(slide_id: str) -> int:
    return int(hashlib.sha1(slide_id.encode("utf-8"), usedforsecurity=False).hexdigest(), 16)


def shard_of(slide_id: str, count: int) -> int:
    """Deterministic shard of a slide id, independent of the input order and of Python's hash seed."""
    return _slide_hash(slide_id) % count


def part_of(slide_id: str, shard_count: int, count: int) -> int:
    """The part (of ``count``, one per ``--devices`` entry) of a slide within its shard of ``shard_count``.

    With ``h`` the slide id's hash, the shard is ``h mod N`` and the part ``(h div N) mod M``: another
    function of the same hash, so the parts of one shard are disjoint, cover it, and are about equal
    whatever ``N`` is; with ``M = 1`` nothing changes.
    """
    return (_slide_hash(slide_id) // shard_count) % count


def select_shard(paths: Sequence[Path], index: int, count: int, part: tuple[int, int] = (0, 1)) -> list[Path]:
    """The slides of shard ``index`` of ``count`` and, within it, of part ``part = (k, M)`` (:func:`part_of`)."""
    k, m = part
    return [p for p in paths if shard_of(p.stem, count) == index and (m == 1 or part_of(p.stem, count, m) == k)]


def run_file_name(shard: tuple[int, int] = (0, 1), part: tuple[int, int] = (0, 1)) -> str:
    """The run file of one process: ``run.json``, ``run.shard-I-of-N.json``, ``run[.shard-I-of-N].device-K-of-M.json``.

    Processes of different shards or parts never write the same file.
    """
    name = "run" if shard[1] == 1 else f"run.shard-{shard[0]}-of-{shard[1]}"
    if part[1] > 1:
        name += f".device-{part[0]}-of-{part[1]}"
    return name + ".json"


@dataclass
class BatchSummary:
    records: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    #: processes of the run that ended without reporting (``extract --devices``), one line each
    crashed: list[str] = field(default_factory=list)

    @property
    def counts(self) -> Counter[str]:
        return Counter(str(r["status"]) for r in self.records)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["status"] not in OK_STATUSES and r["status"] != "locked"]

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.failed else 0

    def text(self) -> str:
        counts = self.counts
        parts = [f"{n} {s}" for s, n in sorted(counts.items())]
        lines = [f"{len(self.records)} slide(s) in {self.seconds:.1f} s: " + (", ".join(parts) or "nothing to do")]
        for r in self.failed:
            lines.append(f"  FAILED {r['slide_id']}: {r.get('error_class', '')}: {r.get('error', '')}")
        for line in self.crashed:
            lines.append(f"  CRASHED {line}")
        if self.interrupted:
            lines.append("  interrupted: rerun the same command to resume")
        return "\n".join(lines)


ProcessFn = Callable[[Path], dict[str, Any]]

#: record fields of a finished slide that a later run that skips it keeps in the manifest
KEPT_WHEN_SKIPPED = ("n_tiles", "n_skipped_tiles", "slide_mpp", "mpp", "footprint_px", "level")


def _source_stamp(path: Path) -> dict[str, Any]:
    try:
        st = path.stat()
    except OSError:
        return {}
    return {"source_bytes": st.st_size, "source_mtime_ns": st.st_mtime_ns}


def _known_no_tissue(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """A previous run found no tissue on this very file with the same settings (R9: not retried)."""
    return (
        old.get("status") == "no_tissue"
        and "config_hash" in new
        and old.get("config_hash") == new["config_hash"]
        and "source_bytes" in new
        and all(old.get(k) == new[k] for k in ("source_bytes", "source_mtime_ns"))
    )


def run_batch(
    paths: Sequence[Path],
    out_dir: Path,
    process: ProcessFn,
    columns: Sequence[str],
    *,
    is_done: Callable[[Path], bool] | None = None,
    progress: bool | None = None,
    desc: str = "slides",
    on_record: Callable[[dict[str, Any]], None] | None = None,
    config_hash: str | None = None,
    redo: bool = False,
    prefetch: Callable[[Path], None] | None = None,
    discard: Callable[[Path], None] | None = None,
    claims: bool = True,
    outputs: Callable[[Path], Sequence[Path]] | None = None,
    write_manifest: bool = True,
) -> BatchSummary:
    """Run ``process(path) -> record fields`` per slide with locks, records and a manifest.

    ``process`` returns at least ``{"status": "done" | "no_tissue"}``; raising records ``failed``
    with the error class and message (the batch goes on), except :class:`OutputError` for disk
    problems, which stops the batch (every later slide would fail the same way).

    Each slide is claimed with an exclusive lock first; a slide locked by another process is left to
    it (status ``locked``, not written to the manifest). ``is_done(path)`` -> ``skipped``. A slide
    recorded as ``no_tissue`` by a run with the same ``config_hash`` (and the same source file size
    and modification time) is not retried unless ``redo``.

    ``prefetch(next_path)`` is called, with the next slide's lock already taken, just before
    ``process`` starts on a slide, so that work for the next slide (opening it, finding tissue, reading
    its first tiles) can overlap this one; ``discard(path)`` is called for a prefetched slide that will
    not be processed (the batch stopped).

    ``outputs(path)``: the files the slide's ``process`` writes; temp files of them left by a killed
    process are removed here, by the one process that holds the slide's claim, just before the slide (or
    its prefetch) starts. ``claims=False`` (``--no-claims``): no locks at all, not even the manifest's;
    the caller promises that no other process is given these slides (disjoint shards). With
    ``write_manifest=False`` the manifest is left to the caller (``extract --devices`` writes it once).
    """
    from wsi_mil.progress import progress_bar

    store = RecordStore(out_dir, columns, locking=claims)
    summary = BatchSummary()
    start = time.perf_counter()
    bar = progress_bar(total=len(paths), desc=desc, unit="slide", enable=progress)
    ahead: dict[int, SlideLock] = {}  # locks of prefetched slides, taken ahead of their turn

    def new_record(path: Path) -> dict[str, Any]:
        record: dict[str, Any] = {"slide_id": path.stem, "path": str(path), **_source_stamp(path)}
        if config_hash is not None:
            record["config_hash"] = config_hash
        return record

    def claim(slide_id: str) -> SlideLock:
        return SlideLock(out_dir, slide_id, enabled=claims)

    def clean(path: Path, lock: SlideLock) -> None:
        for dest in outputs(path) if outputs is not None else ():
            remove_stale_temp_files(dest, claim=lock)

    def look_ahead(i: int) -> None:
        j = i + 1
        if prefetch is None or j >= len(paths) or j in ahead:
            return
        lock = claim(paths[j].stem)
        if not lock.acquire():
            return
        try:
            wanted = not (is_done is not None and is_done(paths[j])) and (
                redo or not _known_no_tissue(store.read(paths[j].stem) or {}, new_record(paths[j]))
            )
            if wanted:
                clean(paths[j], lock)
                prefetch(paths[j])
                ahead[j] = lock
        except Exception as exc:  # prefetching is an optimisation: the slide's turn will tell
            logger.debug("could not prefetch %s: %s", paths[j], exc)
        finally:
            if j not in ahead:
                lock.release()

    try:
        for i, path in enumerate(paths):
            slide_id = path.stem
            prefetched = i in ahead  # claimed and cleaned by look_ahead; its prepare may be writing already
            lock = ahead.pop(i, None) or claim(slide_id)
            if not lock.held and not lock.acquire():
                logger.info("%s is being processed by another process; leaving it", slide_id)
                summary.records.append({"slide_id": slide_id, "path": str(path), "status": "locked"})
                bar.update(1)
                continue
            record = new_record(path)
            t0 = time.perf_counter()
            try:  # the claim is released only after the record is on disk: no other process redoes it
                try:
                    old = store.read(slide_id) or {}
                    if is_done is not None and is_done(path):
                        record.update(status="skipped")
                        for key in KEPT_WHEN_SKIPPED:
                            if key in old:
                                record[key] = old[key]
                    elif not redo and _known_no_tissue(old, record):
                        record.update(
                            status="no_tissue", error_class=old.get("error_class"), error=old.get("error"), n_tiles=0
                        )
                    else:
                        if not prefetched:
                            clean(path, lock)
                        look_ahead(i)
                        record.update(process(path))
                except KeyboardInterrupt:
                    record.update(status="interrupted", error_class="KeyboardInterrupt", error="interrupted by the user")
                    record["seconds"] = round(time.perf_counter() - t0, 3)
                    store.write(record)
                    summary.records.append(record)
                    summary.interrupted = True
                    raise
                except NoTissueError as exc:
                    record.update(status="no_tissue", error_class=type(exc).__name__, error=str(exc), n_tiles=0)
                except OutputError as exc:
                    record.update(status="failed", error_class=type(exc).__name__, error=str(exc))
                    record["seconds"] = round(time.perf_counter() - t0, 3)
                    with contextlib.suppress(OSError, OutputError):
                        store.write(record)
                    summary.records.append(record)
                    raise
                except WsiMilError as exc:
                    # INFO: shown as it happens, and once more in the batch summary, which lists every failed
                    # slide; under -q (warnings only) the summary alone reports it, once
                    logger.info("%s failed: %s: %s", slide_id, type(exc).__name__, exc)
                    record.update(status="failed", error_class=type(exc).__name__, error=str(exc))
                except Exception as exc:
                    logger.error("%s failed unexpectedly:\n%s", slide_id, traceback.format_exc())
                    record.update(status="failed", error_class=type(exc).__name__, error=str(exc))
                record.setdefault("seconds", round(time.perf_counter() - t0, 3))
                store.write(record)
            finally:
                lock.release()
            summary.records.append(record)
            if on_record is not None:
                on_record(record)
            bar.update(1)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        for j, lock in ahead.items():
            if discard is not None:
                with contextlib.suppress(Exception):
                    discard(paths[j])
            lock.release()
        bar.close()
        summary.seconds = time.perf_counter() - start
        if write_manifest:
            try:
                store.write_manifest()
            except OSError as exc:  # the disk may be full, or refuse the folder lock; the records are safe
                logger.error("could not write the manifest: %s", exc)
    return summary


class sigterm_as_interrupt:
    """Treat SIGTERM (docker stop, Slurm pre-emption) like Ctrl-C, so temp files are cleaned up and the
    slide is recorded ``interrupted`` (in the main thread only; elsewhere nothing changes).

    ``keep_handler``: keep a SIGTERM handler the program already set (a process of ``extract --devices``
    has its own). ``ignore_sigxfsz``: ignore SIGXFSZ, so that a file-size limit gives an error the batch can
    report (R14) instead of killing the process.
    """

    def __init__(self, *, keep_handler: bool = True, ignore_sigxfsz: bool = True) -> None:
        self.keep_handler = keep_handler
        self.ignore_sigxfsz = ignore_sigxfsz
        self._old: dict[int, Any] = {}

    def __enter__(self) -> None:
        self._old = {}
        if threading.current_thread() is not threading.main_thread():
            return
        if not self.keep_handler or signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._old[signal.SIGTERM] = signal.signal(signal.SIGTERM, _raise_interrupt)
        if self.ignore_sigxfsz:
            self._old[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")

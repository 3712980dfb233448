"""Per-slide records and the run manifest (``<out>/.records/<slide_id>.json`` and ``<out>/manifest.csv``).

Schema: one JSON object per processed slide with at least ``slide_id`` and ``status`` (each command adds
its own columns, e.g. :data:`wsi_mil.runs.extract.EXTRACT_COLUMNS`). ``manifest.csv`` holds one row per
record, sorted by slide id, with the command's columns; floats are written with 4 significant digits and
``None`` as an empty cell. It is always exactly what :meth:`RecordStore.rebuild_manifest` (a full rebuild
from every record) would write.

Keeping the manifest up to date without reading every record (10,000 slides, hundreds of array tasks on
shared storage): each record write also leaves a marker ``<out>/.records/changed/<slide_id>`` (an empty
file, created *before* the record is replaced), and :meth:`RecordStore.write_manifest` merges only the
marked slides into the current ``manifest.csv``: it reads the manifest, re-reads the record of each marked
slide (a missing or unreadable record drops its row, as a full rebuild would), writes the manifest
atomically and then deletes the markers it merged. The per-slide cost (a marker and a record) does not
depend on how many records the folder holds, and the update reads one file plus the records written since
the previous update, by anyone.

Why this is exact with several processes (shards, claims) on one folder and with processes killed at any
point: a record write (marker, then record) holds the manifest lock *shared*; an update holds it
*exclusive*. So an update never runs between a marker and its record, every record written since the
last update still has its marker, and a process SIGKILLed before its own update leaves markers that the
next update by anyone merges (the kernel drops a dead process's locks). A process killed after creating
a marker but before replacing the record leaves a marker whose record is unchanged: merging it re-reads
the record as it is, which is what a full rebuild reads. The record file, not the marker, is the truth,
so no clock or ordering between hosts is involved; markers are idempotent (one per slide however often
it is written). Slide ids are already file names (the record's name), so they are valid marker names.

The update falls back to a full rebuild (reading every record) when the manifest is missing or
unreadable, when its header differs from the command's columns, or when the folder has no
``.records/manifest.merged`` stamp (written after every update: a folder last written by a wsi-mil
that kept no markers, or whose stamp was removed). Without changes the update reads only the
manifest's first line.

Under ``--no-claims`` (no locks at all, ``locking=False``) every update is a full rebuild that deletes
nothing, and it removes the stamp, so the next update with locks rebuilds in full too.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from wsi_mil.store.atomic import (
    TEMP_PREFIX,
    as_output_error,
    atomic_write_json,
    atomic_write_text,
    is_disk_error,
)
from wsi_mil.store.locks import folder_lock

logger = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
#: the lock taken shared by record writes and exclusive by manifest updates
MANIFEST_LOCK = "manifest"
CHANGED_DIR = "changed"
#: present once an update (incremental or full) has written the manifest: markers are complete from then on
MERGED_STAMP = "manifest.merged"


class RecordStore:
    """One JSON record per slide under ``<out>/.records``; ``manifest.csv`` is kept equal to them."""

    def __init__(self, out_dir: Path, columns: Sequence[str], *, locking: bool = True) -> None:
        self.out_dir = Path(out_dir)
        #: False under ``--no-claims``: no folder locks; every manifest update is then a full rebuild
        self.locking = locking
        self.dir = self.out_dir / ".records"
        self.changed_dir = self.dir / CHANGED_DIR
        self.columns = list(columns)

    def write(self, record: dict[str, Any]) -> None:
        """Write one slide's record (atomically), marking it for the next manifest update; O(1)."""
        slide_id = str(record["slide_id"])
        with folder_lock(self.out_dir, MANIFEST_LOCK, shared=True, enabled=self.locking):
            self._mark(slide_id)
            atomic_write_json(self.dir / f"{slide_id}.json", record)

    def _mark(self, slide_id: str) -> None:
        try:
            self.changed_dir.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.changed_dir / slide_id, os.O_WRONLY | os.O_CREAT, 0o644))
        except OSError as exc:
            if is_disk_error(exc):
                raise as_output_error(exc, self.dir) from exc
            raise

    def read(self, slide_id: str) -> dict[str, Any] | None:
        return _read_record(self.dir / f"{slide_id}.json")

    def all(self) -> list[dict[str, Any]]:
        """Every readable record, in file-name order (unreadable ones are skipped with a warning; temp files of
        a killed writer are no records)."""
        out = []
        for p in sorted(self.dir.glob("*.json")):
            if p.name.startswith(TEMP_PREFIX):
                continue
            record = _read_record(p, warn=True)
            if record is not None:
                out.append(record)
        return out

    def write_manifest(self, name: str = MANIFEST) -> Path:
        """Bring ``<out>/<name>`` up to date with the records: merge the slides written since the last
        update (by any process), or rebuild it from every record when it cannot be trusted (see the module
        docstring). Only ``manifest.csv`` is kept incrementally; another ``name`` is always rebuilt."""
        if name != MANIFEST or not self.locking:
            return self.rebuild_manifest(name)
        with folder_lock(self.out_dir, MANIFEST_LOCK):
            changed = self._changed_ids()
            path = self.out_dir / name
            if not (self.dir / MERGED_STAMP).is_file():
                logger.info("%s: no merge stamp; rebuilding the manifest from every record", self.dir)
                return self._rebuild(path, changed)
            if not changed and _header(path) == self.columns:
                return path
            rows = _read_manifest(path, self.columns)
            if rows is None:
                logger.info("%s is missing or does not have this command's columns; rebuilding it", path)
                return self._rebuild(path, changed)
            for slide_id in changed:
                record = self.read(slide_id)
                if record is None:
                    rows.pop(slide_id, None)
                else:
                    rows[str(record.get("slide_id", ""))] = _csv_text(None, [_row(record, self.columns)])
            text = _csv_text(self.columns, []) + "".join(rows[k] for k in sorted(rows))
            return self._commit(path, text, changed)

    def rebuild_manifest(self, name: str = MANIFEST) -> Path:
        """Write ``<out>/<name>`` from every record (reads them all; the slow, always-correct path)."""
        if not self.locking:
            # --no-claims: another process may be writing a record or the manifest right now, so nothing is
            # deleted (markers, temp records) and the stamp goes: the next locked update rebuilds in full
            with contextlib.suppress(FileNotFoundError):
                (self.dir / MERGED_STAMP).unlink()
            return atomic_write_text(self.out_dir / name, self.manifest_text())
        with folder_lock(self.out_dir, MANIFEST_LOCK):
            if name != MANIFEST:
                return atomic_write_text(self.out_dir / name, self.manifest_text())
            return self._rebuild(self.out_dir / name, self._changed_ids())

    def manifest_text(self) -> str:
        """The manifest a full rebuild writes, as text."""
        rows = sorted(self.all(), key=lambda r: str(r.get("slide_id", "")))
        return _csv_text(self.columns, (_row(r, self.columns) for r in rows))

    def _rebuild(self, path: Path, changed: Sequence[str]) -> Path:
        # under the exclusive lock no record is being written: temp records are those of killed writers
        for tmp in self.dir.glob(f"{TEMP_PREFIX}*.json"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                logger.info("removed %s, left by an interrupted run", tmp)
        return self._commit(path, self.manifest_text(), changed)

    def _commit(self, path: Path, text: str, changed: Sequence[str]) -> Path:
        """Write the manifest, then the stamp, then drop the merged markers (a crash in between only
        leaves markers that the next update merges again)."""
        out = atomic_write_text(path, text)
        stamp = self.dir / MERGED_STAMP
        if not stamp.is_file():
            atomic_write_text(stamp, "manifest.csv holds every record whose marker is gone\n")
        for slide_id in changed:
            with contextlib.suppress(FileNotFoundError):
                (self.changed_dir / slide_id).unlink()
        return out

    def _changed_ids(self) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self.changed_dir))
        except FileNotFoundError:
            return []


def _read_record(path: Path, warn: bool = False) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError):
        if warn:
            logger.warning("ignoring unreadable record %s", path)
        return None


def _row(record: dict[str, Any], columns: Sequence[str]) -> list[str]:
    return [str(_csv_value(record.get(k))) for k in columns]


def _csv_text(columns: Sequence[str] | None, rows: Iterable[Sequence[str]]) -> str:
    """The header (unless ``columns`` is ``None``) and ``rows`` as CSV text, in the dialect the manifest has
    always had (``csv.DictWriter``'s default: excel, ``\\r\\n``)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    if columns is not None:
        writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue()


def _header(path: Path) -> list[str] | None:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return next(csv.reader(fh), None)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def _read_manifest(path: Path, columns: Sequence[str]) -> dict[str, str] | None:
    """The text of each row of a manifest (as written, so unchanged rows are copied, not re-encoded) by slide
    id, or ``None`` when it cannot be merged into (missing, unreadable, other columns, a row of the wrong width
    or not ending in ``\\r\\n``, a slide id twice)."""
    if "slide_id" not in columns:
        return None
    key = list(columns).index("slide_id")
    lines: list[str] = []  # the physical lines of the row being parsed (a cell may hold line breaks)

    def feed(fh: Iterable[str]) -> Iterator[str]:
        for line in fh:
            lines.append(line)
            yield line

    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(feed(fh))
            if next(reader, None) != list(columns):
                return None
            rows: dict[str, str] = {}
            lines.clear()
            for row in reader:
                text = "".join(lines)
                lines.clear()
                if len(row) != len(columns) or row[key] in rows or not text.endswith("\r\n"):
                    return None
                rows[row[key]] = text
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    return rows


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return value

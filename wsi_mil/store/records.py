"""Per-slide records and the run manifest (``<out>/.records/<slide_id>.json`` and ``<out>/manifest.csv``).

Schema: one JSON object per processed slide with at least ``slide_id`` and ``status`` (each command adds
its own columns, e.g. :data:`wsi_mil.runs.extract.EXTRACT_COLUMNS`). ``manifest.csv`` is rebuilt from all
records under a folder lock (none under ``--no-claims``), so concurrent processes never overwrite each
other's rows; floats are written with 4 significant digits and ``None`` as an empty cell.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wsi_mil.store.atomic import atomic_write_json, atomic_write_text
from wsi_mil.store.locks import folder_lock

logger = logging.getLogger(__name__)


class RecordStore:
    """One JSON record per slide under ``<out>/.records``; ``manifest.csv`` is built from them."""

    def __init__(self, out_dir: Path, columns: Sequence[str], *, locking: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.dir = self.out_dir / ".records"
        self.columns = list(columns)
        self.locking = locking  # False under --no-claims: the manifest is rebuilt without the folder lock

    def write(self, record: dict[str, Any]) -> None:
        atomic_write_json(self.dir / f"{record['slide_id']}.json", record)

    def read(self, slide_id: str) -> dict[str, Any] | None:
        p = self.dir / f"{slide_id}.json"
        try:
            return dict(json.loads(p.read_text(encoding="utf-8")))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def all(self) -> list[dict[str, Any]]:
        out = []
        for p in sorted(self.dir.glob("*.json")):
            try:
                out.append(dict(json.loads(p.read_text(encoding="utf-8"))))
            except json.JSONDecodeError:
                logger.warning("ignoring unreadable record %s", p)
        return out

    def write_manifest(self, name: str = "manifest.csv") -> Path:
        with folder_lock(self.out_dir, "manifest", enabled=self.locking):
            rows = sorted(self.all(), key=lambda r: str(r.get("slide_id", "")))
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _csv_value(row.get(k)) for k in self.columns})
            return atomic_write_text(self.out_dir / name, buf.getvalue())


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return value

"""What makes a ``wsi-mil train`` run resumable: its key, and each finished fold's record.

A run is identified by a key, the SHA-256 of its resolved config, its bag files (per slide: the id, tile
count, feature dimension, file size and the attributes that pin what the features are: extraction config
hash, weights hash, slide fingerprint) and its splits. It is written to ``RUN/run_state.json`` before the
first fold trains. Each fold, once its checkpoint is saved, writes ``RUN/fold_<k>/report.json``: the key,
its report (metrics, training record), its out-of-fold predictions and its lines of ``history.jsonl`` and
``train.log``.

Run again, the same command finds the same key: finished folds are read back, not retrained, and a run
whose every fold is finished and whose ``metrics.json`` exists is left as it is. Another config, other bag
files or other splits give another key: the folder is refused unless ``--overwrite`` starts it over. A
fold killed before its report was written is trained again from the start (each fold seeds itself, so the
result is the same as an uninterrupted run's in deterministic mode).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil import __version__
from wsi_mil.cohort.splits import FoldSplit
from wsi_mil.config.base import StrictModel
from wsi_mil.errors import OutputConflictError
from wsi_mil.store import atomic_write_json, ensure_writable_dir

logger = logging.getLogger(__name__)

__all__ = ["FOLD_REPORT", "RUN_STATE", "load_fold", "prepare_run_folder", "read_run_key", "run_key", "save_fold"]

RUN_STATE = "run_state.json"
FOLD_REPORT = "report.json"
_CHECKPOINT_FILES = ("model.json", "model.safetensors")
#: bag attributes that pin what a bag's features are
_BAG_IDENTITY = ("config_hash", "weights_sha256", "slide_fingerprint", "encoder_name", "wsi_mil_version")
#: config keys that change no result (a bag a rescan leaves out changes the key through the bags and splits), so
#: a run can be resumed with or without them, also a run made before they existed
_NOT_IN_RUN_KEY = {"recheck"}


def run_key(config: StrictModel, bags: dict[str, tuple[int, int, int, dict[str, Any]]], folds: Sequence[FoldSplit]) -> str:
    """The key of a run: ``bags`` maps slide id to (tiles, feature dim, file bytes, bag attributes)."""
    blob = {
        "config": config.model_dump(mode="json", exclude=_NOT_IN_RUN_KEY),
        "bags": {
            s: [n, dim, size, {k: str(attrs.get(k, "")) for k in _BAG_IDENTITY}]
            for s, (n, dim, size, attrs) in sorted(bags.items())
        },
        "splits": [[f.fold, f.train, f.val, f.test] for f in folds],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def read_run_key(out: Path) -> str | None:
    try:
        return str(json.loads((out / RUN_STATE).read_text(encoding="utf-8"))["run_key"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare_run_folder(out: Path, outputs: Sequence[str], overwrite: bool) -> None:
    """Refuse a folder holding a run that cannot be resumed (no run state); clear it under ``overwrite``."""
    existing = [name for name in (*outputs, RUN_STATE) if (out / name).exists()]
    folds = sorted(p for p in out.glob("fold_*") if p.is_dir()) if out.is_dir() else []
    if (existing or folds) and not overwrite and read_run_key(out) is None:
        raise OutputConflictError(
            f"{out} already holds a training run ({', '.join(existing + [p.name for p in folds][:3])}) that "
            "records no run state to resume; choose another --out folder or pass --overwrite."
        )
    ensure_writable_dir(out)
    if not overwrite:
        return
    for fold_dir in folds:  # stale checkpoints of an earlier run would be picked up by `predict RUN`
        for name in (*_CHECKPOINT_FILES, FOLD_REPORT):
            (fold_dir / name).unlink(missing_ok=True)
        try:
            fold_dir.rmdir()
        except OSError:
            logger.warning("%s is not empty; left in place without its checkpoint", fold_dir)
    for name in existing:
        (out / name).unlink(missing_ok=True)


def claim_run(out: Path, key: str) -> None:
    """Record ``key`` as the run in ``out``; refuse a folder that holds a run of another key."""
    recorded = read_run_key(out)
    if recorded is not None and recorded != key:
        raise OutputConflictError(
            f"{out} holds a training run of another config, other bag files or other splits (run key "
            f"{recorded[:12]}, this one {key[:12]}); choose another --out folder, or pass --overwrite to start over."
        )
    if recorded is None:
        atomic_write_json(out / RUN_STATE, {"run_key": key, "wsi_mil_version": __version__})


def save_fold(out: Path, fold: int, key: str, report: dict[str, Any], history: list[str], log: list[str]) -> None:
    """Record a finished fold (after its checkpoint is saved)."""
    record = {
        "run_key": key,
        "report": {k: v for k, v in report.items() if k != "_predictions"},
        "predictions": [[slide, [float(p) for p in probs], str(np.asarray(probs).dtype)] for slide, probs in report["_predictions"]],
        "history": history,
        "log": log,
    }
    atomic_write_json(out / f"fold_{fold}" / FOLD_REPORT, record)


def load_fold(out: Path, fold: int, key: str) -> tuple[dict[str, Any], list[str], list[str]] | None:
    """A finished fold of this run: (report with ``_predictions``, history lines, log lines), or ``None``."""
    folder = out / f"fold_{fold}"
    try:
        record = json.loads((folder / FOLD_REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("run_key") != key or not all((folder / name).is_file() for name in _CHECKPOINT_FILES):
        return None
    report = dict(record["report"])
    report["_predictions"] = [(str(s), np.asarray(p, dtype=dtype)) for s, p, dtype in record["predictions"]]
    return report, [str(line) for line in record["history"]], [str(line) for line in record["log"]]

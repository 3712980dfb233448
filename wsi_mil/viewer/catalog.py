"""What the viewer may show: the slides, scores and side files of one run, found once at start-up.

``wsi-mil view DIR`` takes one of

* a pipeline run (``wsi-mil pipeline --out DIR``): slides and failures from ``extract/manifest.csv``,
  predictions from ``predict/predictions.csv``, per-tile scores ``predict/scores/<id>.h5``, reasons for
  slides predict skipped from ``predict/predict.json``, tissue contours ``extract/tissue/<id>.geojson``,
  the review page ``heatmaps/``, and the sample cohort's lesion annotations ``cohort/annotations/``;
* a heatmap folder (``wsi-mil heatmap --out DIR``): slides and failures from ``manifest.csv``, predictions
  from ``<id>/summary.json``, per-tile scores from ``<id>/heatmap.h5`` (or from the score files of the
  pipeline run it lies in), tissue contours from the ``tissue`` mask of ``heatmap.h5``;
* a predict folder (``wsi-mil predict --out DIR``), with ``--slides``.

``--slides`` replaces the slide paths the manifests recorded (matched by slide id). Every file the
server reads is one of the paths recorded here, looked up by slide id; request paths never become file
paths. A slide is *viewable* once its file exists and, when its scores record the slide file's
fingerprint (:mod:`wsi_mil.slide.identity`), :meth:`Catalog.verify` found the same fingerprint;
otherwise it is listed as ``missing`` or ``unavailable`` with the reason, and the others are served.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_mil.errors import InputError, WsiMilError
from wsi_mil.slide import Slide, SlideFingerprint, open_slide
from wsi_mil.store.heatmap_file import read_heatmap_h5
from wsi_mil.store.score_file import SlideScores, find_scores, load_scores

logger = logging.getLogger(__name__)

__all__ = ["Catalog", "SlideEntry"]

#: statuses of a slide in the cohort list; only ``ok`` slides are served
VIEWABLE = "ok"
_SKIP_REASONS = {
    "empty": "no tiles: nothing was scored on this slide",
    "non_finite": "its features hold NaN/Inf values; re-extract the slide",
    "trained_on": "every checkpoint trained on this slide, so it has no out-of-fold score",
}


@dataclass
class SlideEntry:
    """One slide of the run as the cohort page lists it."""

    slide_id: str
    path: Path | None = None
    status: str = VIEWABLE
    reason: str = ""
    label: str = ""
    predicted_class: str = ""
    probability: float = math.nan  # of the predicted class
    class_probabilities: dict[str, float] = field(default_factory=dict)
    scored_by: str = ""
    n_checkpoints: int = 1
    n_tiles: int | None = None
    #: a score file (``scores/<id>.h5``) or a ``heatmap.h5`` with the same per-tile arrays
    scores_path: Path | None = None
    summary_path: Path | None = None
    tissue_path: Path | None = None
    annotation_path: Path | None = None
    #: level-0 µm/px the slide was read at (from the scores), so its fingerprint compares like for like
    slide_mpp: float | None = None
    #: level-0 (width, height) and µm/px of the slide file, once :meth:`Catalog.verify` opened it
    dimensions: tuple[int, int] | None = None
    mpp: float | None = None
    checked: bool = False

    @property
    def viewable(self) -> bool:
        return self.status == VIEWABLE

    @property
    def correct(self) -> bool | None:
        if not self.label or not self.predicted_class:
            return None
        return self.label == self.predicted_class

    def describe(self) -> dict[str, Any]:
        """JSON for the cohort page (no file paths: only the file name of the slide)."""
        return {
            "slide_id": self.slide_id,
            "file": self.path.name if self.path is not None else "",
            "status": self.status,
            "reason": self.reason,
            "label": self.label,
            "predicted_class": self.predicted_class,
            "probability": None if not math.isfinite(self.probability) else self.probability,
            "class_probabilities": self.class_probabilities,
            "scored_by": self.scored_by,
            "n_checkpoints": self.n_checkpoints,
            "n_tiles": self.n_tiles,
            "correct": self.correct,
            "has_annotations": self.annotation_path is not None,
        }


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return list(csv.DictReader(fh))
    except OSError:
        return []


def _float(text: Any) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _resolve(recorded: str, root: Path) -> Path | None:
    if not recorded:
        return None
    p = Path(recorded)
    if not p.is_absolute() and not p.exists() and (root / p).exists():
        p = root / p
    return p


class Catalog:
    """The slides of one run (see the module docstring)."""

    def __init__(self, root: Path, kind: str, entries: list[SlideEntry], class_names: Sequence[str],
                 review_dir: Path | None, backend: str = "auto") -> None:
        self.root = root
        self.kind = kind
        self.entries: dict[str, SlideEntry] = {e.slide_id: e for e in entries}
        self.class_names = tuple(class_names)
        #: the folder of the static review page (``index.html``), served under ``/review/``
        self.review_dir = review_dir
        self.backend = backend
        self._locks: dict[str, threading.Lock] = {sid: threading.Lock() for sid in self.entries}

    # --- discovery ----------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str],
        *,
        slides: Sequence[Path] | None = None,
        annotations: str | os.PathLike[str] | None = None,
        backend: str = "auto",
    ) -> Catalog:
        """Find the slides, scores and side files of the run in ``root``; :class:`InputError` when it is none."""
        base = Path(root)
        if not base.is_dir():
            raise InputError(f"{base} is not a folder: give the --out folder of `wsi-mil pipeline`, `heatmap` or `predict`.")
        if (base / "predict" / "scores").is_dir() or (base / "extract" / "manifest.csv").is_file():
            catalog = cls._from_run(base, backend)
        elif (base / "manifest.csv").is_file() and any(base.glob("*/summary.json")):
            catalog = cls._from_heatmaps(base, backend)
        elif (base / "scores").is_dir():
            catalog = cls._from_predict(base, base, [], backend)
        else:
            raise InputError(
                f"{base} holds no wsi-mil run: expected a pipeline run (predict/scores/, extract/manifest.csv), "
                "a heatmap folder (manifest.csv and <slide>/summary.json) or a predict folder (scores/)."
            )
        if slides:
            catalog._use_slide_paths(slides)
        ann = Path(annotations) if annotations is not None else (base / "cohort" / "annotations")
        if annotations is not None and not ann.is_dir():
            raise InputError(f"--annotations {ann} is not a folder of <slide_id>.geojson files.")
        if ann.is_dir():
            catalog._find_side_files(ann, "annotation_path")
        for entry in catalog.entries.values():
            if entry.viewable and entry.path is None:
                entry.status, entry.reason = "missing", "no slide file is recorded for it; pass --slides"
            elif entry.viewable and entry.scores_path is None:
                entry.status, entry.reason = "not_scored", entry.reason or "no scores for this slide"
        if not catalog.entries:
            raise InputError(f"{base}: the run lists no slides.")
        return catalog

    @classmethod
    def _from_run(cls, base: Path, backend: str) -> Catalog:
        entries: dict[str, SlideEntry] = {}
        for row in _read_csv(base / "extract" / "manifest.csv"):
            sid = row.get("slide_id", "")
            if not sid:
                continue
            entry = SlideEntry(sid, path=_resolve(row.get("path", ""), base))
            status = row.get("status", "")
            if status in ("failed", "no_tissue", "skipped"):
                entry.status = status
                entry.reason = row.get("error", "") or {"no_tissue": "no tissue found"}.get(status, status)
            entries[sid] = entry
        review = base / "heatmaps" if (base / "heatmaps" / "index.html").is_file() else None
        catalog = cls._from_predict(base / "predict", base, list(entries.values()), backend)
        catalog.review_dir = review
        tissue = base / "extract" / "tissue"
        if tissue.is_dir():
            catalog._find_side_files(tissue, "tissue_path")
        if review is not None:
            for sid, entry in catalog.entries.items():
                summary = review / sid / "summary.json"
                entry.summary_path = summary if summary.is_file() else None
        return catalog

    @classmethod
    def _from_predict(cls, predict: Path, base: Path, known: list[SlideEntry], backend: str) -> Catalog:
        entries = {e.slide_id: e for e in known}
        files = find_scores(predict) if (predict / "scores").is_dir() else {}
        try:
            meta = json.loads((predict / "predict.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            meta = {}
        class_names = [str(c) for c in meta.get("classes") or ()]
        for row in _read_csv(predict / "predictions.csv"):
            sid = row.get("slide_id", "")
            if not sid:
                continue
            entry = entries.setdefault(sid, SlideEntry(sid))
            probs = {k[5:]: _float(v) for k, v in row.items() if k and k.startswith("prob_")}
            entry.class_probabilities = probs
            entry.label = row.get("label", "") or ""
            entry.predicted_class = row.get("predicted", "") or ""
            entry.probability = probs.get(entry.predicted_class, math.nan)
            entry.scored_by = row.get("scored_by", "") or ""
            entry.n_tiles = int(_float(row.get("n_tiles"))) if math.isfinite(_float(row.get("n_tiles"))) else None
            class_names = class_names or list(probs)
        skipped = meta.get("skipped") if isinstance(meta.get("skipped"), dict) else {}
        for reason, ids in (skipped or {}).items():
            for sid in ids or ():
                entry = entries.setdefault(str(sid), SlideEntry(str(sid)))
                if entry.viewable:
                    entry.status, entry.reason = "not_scored", _SKIP_REASONS.get(reason, f"skipped by predict ({reason})")
        for sid, path in files.items():
            entries.setdefault(sid, SlideEntry(sid)).scores_path = path
        return cls(base, "run" if known else "predict", sorted(entries.values(), key=lambda e: e.slide_id),
                   class_names, None, backend)

    @classmethod
    def _from_heatmaps(cls, base: Path, backend: str) -> Catalog:
        entries: list[SlideEntry] = []
        class_names: list[str] = []
        run_scores = base.parent / "predict" / "scores"
        score_files = find_scores(run_scores) if run_scores.is_dir() else {}
        for row in _read_csv(base / "manifest.csv"):
            sid = row.get("slide_id", "")
            if not sid:
                continue
            entry = SlideEntry(sid, path=_resolve(row.get("path", ""), base))
            status = row.get("status", "")
            if status != "done":
                entry.status = "failed" if status == "failed" else "not_scored"
                entry.reason = row.get("error", "") or row.get("note", "") or status
            summary = base / sid / "summary.json"
            try:
                s = json.loads(summary.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                s = None
            if s is not None:
                entry.summary_path = summary
                entry.label = str(s.get("label") or "")
                entry.predicted_class = str(s.get("predicted_class") or "")
                entry.probability = _float(s.get("probability"))
                entry.class_probabilities = {str(k): _float(v) for k, v in (s.get("class_probabilities") or {}).items()}
                entry.scored_by = str(s.get("scored_by") or "")
                entry.n_checkpoints = int(s.get("n_checkpoints") or 1)
                entry.n_tiles = int(s.get("n_tiles") or 0)
                class_names = class_names or list(entry.class_probabilities)
                if s.get("note") and entry.viewable:
                    entry.status, entry.reason = "not_scored", str(s["note"])
            h5 = base / sid / "heatmap.h5"
            entry.scores_path = score_files.get(sid) or (h5 if h5.is_file() else None)
            entries.append(entry)
        return cls(base, "heatmap", entries, class_names, base if (base / "index.html").is_file() else None, backend)

    def _use_slide_paths(self, slides: Sequence[Path]) -> None:
        by_id = {Path(p).stem: Path(p) for p in slides}
        for sid, entry in self.entries.items():
            if sid in by_id:
                entry.path = by_id[sid]
            elif entry.viewable:
                entry.status, entry.reason = "missing", "not among the slides given with --slides"

    def _find_side_files(self, folder: Path, attr: str) -> None:
        """Set ``attr`` of each entry to ``folder/<slide_id>.geojson`` when that is a file inside ``folder``."""
        real = folder.resolve()
        for sid, entry in self.entries.items():
            candidate = folder / f"{sid}.geojson"
            try:
                resolved = candidate.resolve(strict=True)
            except (OSError, RuntimeError):
                continue
            if resolved.is_file() and resolved.is_relative_to(real):
                setattr(entry, attr, resolved)
            else:
                logger.warning("%s points outside %s; not served", candidate, folder)

    # --- use ----------------------------------------------------------------------------------------
    def get(self, slide_id: str) -> SlideEntry | None:
        return self.entries.get(slide_id)

    def viewable_ids(self) -> list[str]:
        """The slides that can be shown, in the run's order (every slide verified first)."""
        self.verify_all()
        return [sid for sid, e in self.entries.items() if e.viewable]

    def load_scores(self, entry: SlideEntry) -> SlideScores:
        """The per-tile scores of ``entry`` (a score file, or the arrays of its ``heatmap.h5``)."""
        if entry.scores_path is None:
            raise InputError(f"slide '{entry.slide_id}' has no scores")
        if entry.scores_path.name != "heatmap.h5":
            return load_scores(entry.scores_path)
        arrays = read_heatmap_h5(entry.scores_path)
        a = arrays.attrs
        classes = tuple(str(c) for c in a.get("class_names") or entry.class_probabilities)
        return SlideScores(
            slide_id=entry.slide_id, coords=arrays.coords.astype("int64"), attention=arrays.attention.astype("float64"),
            instance_probabilities=arrays.instance_probabilities, class_names=classes,
            bag_probabilities=tuple(entry.class_probabilities.get(c, math.nan) for c in classes),
            predicted_class=entry.predicted_class, label=entry.label, model="", n_checkpoints=entry.n_checkpoints,
            tile_px=int(a.get("tile_px", 0) or 0), mpp=_float(a.get("tile_mpp")), footprint_px=float(a["footprint_px"]),
            slide_mpp=_float(a.get("slide_mpp")) if math.isfinite(_float(a.get("slide_mpp"))) else None,
            encoder_name="", path=entry.scores_path, scored_by=entry.scored_by,
            slide_fingerprint=str(a.get("slide_fingerprint", "") or ""),
        )

    def open_slide(self, entry: SlideEntry) -> Slide:
        """A new handle of the slide file of ``entry`` (at the µm/px its scores were made at)."""
        if entry.path is None:
            raise InputError(f"slide '{entry.slide_id}' has no file")
        return open_slide(entry.path, backend=self.backend, mpp=entry.slide_mpp)  # type: ignore[arg-type]

    def verify(self, slide_id: str) -> SlideEntry:
        """Check once that the slide file exists, opens and is the one its scores were made from."""
        entry = self.entries[slide_id]
        with self._locks[slide_id]:
            if entry.checked or not entry.viewable:
                return entry
            entry.checked = True
            assert entry.path is not None
            if not entry.path.is_file():
                self.mark_missing(entry, "the slide file is missing")
                return entry
            try:
                scores = self.load_scores(entry)
                recorded = SlideFingerprint.from_json(scores.slide_fingerprint)
                entry.slide_mpp = recorded.mpp if recorded is not None else scores.slide_mpp
                entry.n_tiles = scores.n_tiles
                with self.open_slide(entry) as slide:
                    actual = slide.fingerprint()
                    entry.dimensions, entry.mpp = slide.dimensions, slide.mpp
            except (WsiMilError, OSError, ValueError) as exc:
                entry.status, entry.reason = "unavailable", f"{type(exc).__name__}: {exc}"
                logger.warning("%s: not viewable: %s", slide_id, entry.reason)
                return entry
            if recorded is None:
                logger.info("%s: the scores record no slide fingerprint (older files); identity not checked", slide_id)
                return entry
            differences = recorded.differences(actual)
            if differences:
                entry.status = "unavailable"
                entry.reason = (
                    f"the scores ({scores.path.name if scores.path else 'scores'}) were made from another slide file "
                    f"than {entry.path.name} ({'; '.join(differences)}); run predict again on this slide"
                )
                logger.warning("%s: %s", slide_id, entry.reason)
        return entry

    def verify_all(self) -> None:
        for sid in list(self.entries):
            self.verify(sid)

    def mark_missing(self, entry: SlideEntry, reason: str) -> None:
        entry.status, entry.reason = "missing", reason
        logger.warning("%s: %s", entry.slide_id, reason)

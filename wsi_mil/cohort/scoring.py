"""Which checkpoints may score which slide: out-of-fold by construction.

A slide that a training run listed in its ``splits.csv`` is scored only by checkpoints that never saw it:
with the fold models of one run that is the fold that held it out (``held_out:fold_3``). A slide the
run never saw is scored by the ensemble of the checkpoints (``ensemble:5``). A slide that every given
checkpoint trained on (train or val part of its fold) gets no score, unless the user asks for the whole
ensemble on every slide (``ensemble_all``, for deployment), in which case such a slide's label is
``in_sample:ensemble:5`` and every metric over it is marked in-sample.

What a checkpoint saw comes from its sidecar (``training.fold``) and the ``splits.csv`` of its run
folder (the folder above ``fold_<k>/``). A checkpoint without them (copied out of its run) is taken to
have seen no slide, with a warning, since wsi-mil cannot tell.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_mil.errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["SLIDE_FINGERPRINTS", "Scorer", "ScoringPlan", "describe_scored_by", "fold_parts"]

SPLITS_NAME = "splits.csv"
#: ``{slide_id: fingerprint JSON}`` of the slides a training run used (:mod:`wsi_mil.slide.identity`)
SLIDE_FINGERPRINTS = "slide_fingerprints.json"


def fold_parts(path: Path) -> dict[int, dict[str, set[str]]]:
    """``{fold: {"train": ids, "val": ids, "test": ids}}`` from a run's ``splits.csv``."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise InputError(f"cannot read {path} ({exc}); it is the record of which slide each fold trained on.") from exc
    out: dict[int, dict[str, set[str]]] = {}
    for line_no, row in enumerate(rows, start=2):
        try:
            fold, split, slide_id = int(row["fold"]), row["split"].strip(), row["slide_id"].strip()
        except (KeyError, ValueError, AttributeError) as exc:
            raise InputError(f"{path}, line {line_no}: expected columns slide_id, fold, split ({exc}).") from exc
        out.setdefault(fold, {"train": set(), "val": set(), "test": set()}).setdefault(split, set()).add(slide_id)
    return out


@dataclass(frozen=True)
class Scorer:
    """The checkpoints that score one slide and how to say so."""

    #: indices into the checkpoint list
    indices: tuple[int, ...]
    #: ``held_out:fold_<k>``, ``ensemble:<n>`` or ``in_sample:ensemble:<n>``
    label: str

    @property
    def in_sample(self) -> bool:
        return self.label.startswith("in_sample:")


class ScoringPlan:
    """Assigns each slide its scorer from the checkpoints' training records (see the module docstring)."""

    def __init__(self, sidecars: Sequence[Path], metas: Sequence[dict[str, Any]], *, ensemble_all: bool = False) -> None:
        self.ensemble_all = ensemble_all
        self.n = len(sidecars)
        #: per checkpoint: slides it trained on (train + val), its test slides, and its fold name
        self.seen: list[set[str]] = []
        self.tested: list[set[str]] = []
        self.names: list[str] = []
        parts_of_run: dict[Path, dict[int, dict[str, set[str]]]] = {}
        #: the fingerprint each run recorded for a slide id: ``{slide_id: (run, fingerprint JSON)}``
        self.recorded: dict[str, tuple[Path, str]] = {}
        unknown: list[str] = []
        for sidecar, meta in zip(sidecars, metas, strict=True):
            fold = (meta.get("training") or {}).get("fold")
            run = Path(sidecar).parent.parent
            splits = run / SPLITS_NAME
            if fold is None or not splits.is_file():
                unknown.append(str(sidecar))
                self.seen.append(set())
                self.tested.append(set())
                self.names.append(Path(sidecar).parent.name)
                continue
            if run not in parts_of_run:
                parts_of_run[run] = fold_parts(splits)
                self._read_fingerprints(run)
            parts = parts_of_run[run].get(int(fold), {"train": set(), "val": set(), "test": set()})
            self.seen.append(parts["train"] | parts["val"])
            self.tested.append(parts["test"])
            self.names.append(f"fold_{int(fold)}")
        if unknown:
            logger.warning(
                "%d checkpoint(s) have no training record (fold + the run's %s): wsi-mil cannot tell which slides "
                "they trained on and treats them as having seen none: %s",
                len(unknown), SPLITS_NAME, unknown[:5],
            )

    def _read_fingerprints(self, run: Path) -> None:
        path = run / SLIDE_FINGERPRINTS
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            logger.info("%s records no slide fingerprints (a run of wsi-mil before they existed)", run)
            return
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{path} is unreadable ({exc}); it records which slide file each id was.") from exc
        for slide_id, fingerprint in data.items():
            if fingerprint:
                self.recorded[str(slide_id)] = (run, str(fingerprint))

    def identity_conflicts(self, fingerprints: dict[str, str]) -> list[str]:
        """For bags ``{slide_id: fingerprint JSON}``: a sentence per slide id whose bag came from another
        slide file than the one a training run recorded under that id (empty when all agree)."""
        from wsi_mil.slide.identity import SlideFingerprint

        out = []
        for slide_id, text in sorted(fingerprints.items()):
            if slide_id not in self.recorded or not text:
                continue
            run, recorded = self.recorded[slide_id]
            ours, theirs = SlideFingerprint.from_json(text), SlideFingerprint.from_json(recorded)
            if ours is None or theirs is None:
                continue
            differences = theirs.differences(ours)
            if differences:
                out.append(f"'{slide_id}' ({'; '.join(differences)} than the slide of run {run})")
        return out

    def scorer(self, slide_id: str) -> Scorer | None:
        """The checkpoints that score ``slide_id``; ``None`` when every checkpoint trained on it."""
        everyone = tuple(range(self.n))
        unseen = tuple(i for i in everyone if slide_id not in self.seen[i])
        if self.ensemble_all:
            prefix = "" if len(unseen) == self.n else "in_sample:"
            return Scorer(everyone, f"{prefix}ensemble:{self.n}")
        if not unseen:
            return None
        held_out = [i for i in unseen if slide_id in self.tested[i]]
        if len(unseen) == 1 and held_out:
            return Scorer(unseen, f"held_out:{self.names[unseen[0]]}")
        return Scorer(unseen, f"ensemble:{len(unseen)}")


def describe_scored_by(scored_by: str, n_checkpoints: int = 1) -> str:
    """How a slide was scored, in words for captions and pages (``""`` when the file does not say)."""
    kind, _, rest = scored_by.partition(":")
    if kind == "held_out":
        return f"held-out {rest.replace('_', ' ')}, never trained on this slide"
    if kind == "ensemble":
        return f"average of {rest} checkpoint(s), none trained on this slide"
    if kind == "in_sample":
        n = rest.rpartition(":")[2]
        return f"IN-SAMPLE: {n} checkpoint(s), some trained on this slide"
    return f"{n_checkpoints} checkpoints averaged" if n_checkpoints > 1 else ""


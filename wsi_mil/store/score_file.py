"""Per-tile score files written by ``wsi-mil predict`` (``OUT/scores/<slide_id>.h5``): read, check, write.

Layout (one file per slide):

* datasets ``coords`` (N, 2) int64 level-0 top-left (x, y); ``attention`` (N,) float32, sums to 1;
  ``instance_probabilities`` (N, K) float32, the tile's own class probabilities (shared classifier);
* attributes ``slide_id``, ``class_names`` and ``bag_probabilities`` (JSON lists), ``predicted_class``,
  ``label`` ("" when unknown), ``model``, ``n_checkpoints``, ``tile_px``, ``mpp`` (tile µm/px),
  ``footprint_px`` (level-0 tile side), ``slide_mpp``, ``encoder_name``, ``source_feature_file`` and
  ``scored_by`` (``held_out:fold_3``, ``ensemble:5`` or ``in_sample:ensemble:5``: which checkpoints scored the
  slide, see :mod:`wsi_mil.cohort.scoring`; absent in files of wsi-mil before it existed) and
  ``slide_fingerprint`` (JSON, :mod:`wsi_mil.slide.identity`: the slide file the bag was extracted from).

:func:`write_scores` is the one writer (``wsi-mil predict``, tests, benchmarks) and :func:`load_scores` the
one validating reader (``wsi-mil heatmap``, benchmarks); ``model_name`` (= ``model``) and
``wsi_mil_version`` are also stored. Files written before ``wsi_mil_version`` existed read the same.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import BagFileError
from wsi_mil.store.atomic import as_output_error, atomic_path
from wsi_mil.store.hdf5 import h5_open, open_for_reading, positive_float, written_by

logger = logging.getLogger(__name__)

REQUIRED_DATASETS = ("coords", "attention", "instance_probabilities")
REQUIRED_ATTRS = ("class_names", "bag_probabilities", "predicted_class")


@dataclass(frozen=True, eq=False)
class SlideScores:
    """The per-tile scores of one slide and the slide-level prediction."""

    slide_id: str
    coords: np.ndarray  # (N, 2) int64, level-0 top-left x, y
    attention: np.ndarray  # (N,) float64
    instance_probabilities: np.ndarray  # (N, K) float32
    class_names: tuple[str, ...]
    bag_probabilities: tuple[float, ...]
    predicted_class: str
    label: str
    model: str
    n_checkpoints: int
    tile_px: int
    mpp: float  # tile µm/px
    footprint_px: float  # level-0 tile side
    slide_mpp: float | None
    encoder_name: str
    path: Path | None = None
    #: how the slide was scored: ``held_out:fold_3``, ``ensemble:5``, ``in_sample:ensemble:5`` ("" unknown)
    scored_by: str = ""
    #: JSON of the :class:`~wsi_mil.slide.identity.SlideFingerprint` of the slide the bag came from ("": unknown)
    slide_fingerprint: str = ""

    @property
    def in_sample(self) -> bool:
        """True when a model that scored this slide trained on it."""
        return self.scored_by.startswith("in_sample:")

    @property
    def n_tiles(self) -> int:
        return int(self.coords.shape[0])

    def class_index(self, name: str) -> int:
        try:
            return self.class_names.index(name)
        except ValueError:
            raise BagFileError(
                f"Slide '{self.slide_id}': class {name!r} is not one of the model's classes {list(self.class_names)}. "
                "Set `class_name` to one of them (or leave it empty)."
            ) from None

    def probability_of(self, name: str) -> float:
        return float(self.bag_probabilities[self.class_index(name)])

    @property
    def predicted_probability(self) -> float:
        if self.predicted_class in self.class_names:
            return self.probability_of(self.predicted_class)
        return float(max(self.bag_probabilities, default=math.nan))


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _text(value.item())
    return str(value)


def _json_list(value: Any, what: str, where: str) -> list[Any]:
    try:
        out = json.loads(_text(value))
    except json.JSONDecodeError as exc:
        raise BagFileError(f"{where}: attribute {what} is not a JSON list ({exc}).") from exc
    if not isinstance(out, list):
        raise BagFileError(f"{where}: attribute {what} must be a JSON list, got {type(out).__name__}.")
    return out



def empty_scores(slide_id: str, class_names: tuple[str, ...], model: str = "") -> SlideScores:
    """Scores of a slide with no tiles (``wsi-mil predict`` lists it as empty and writes no file)."""
    return SlideScores(
        slide_id=slide_id, coords=np.zeros((0, 2), np.int64), attention=np.zeros(0), instance_probabilities=np.zeros(
            (0, len(class_names)), np.float32), class_names=class_names,
        bag_probabilities=tuple(math.nan for _ in class_names), predicted_class="", label="", model=model,
        n_checkpoints=0, tile_px=0, mpp=math.nan, footprint_px=1.0, slide_mpp=None, encoder_name="",
    )


def empty_slides(predict_out: str | os.PathLike[str]) -> tuple[set[str], tuple[str, ...], str]:
    """Slides that ``wsi-mil predict`` skipped for having no tiles (from ``predict.json``), its classes and model."""
    try:
        meta = json.loads((Path(predict_out) / "predict.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return set(), (), ""
    skipped = meta.get("skipped") or {}
    empty = skipped.get("empty") or [] if isinstance(skipped, dict) else []
    return {str(s) for s in empty}, tuple(str(c) for c in meta.get("classes") or ()), str(meta.get("model_name", ""))


def scores_path(scores_dir: str | os.PathLike[str], slide_id: str) -> Path:
    return Path(scores_dir) / f"{slide_id}.h5"


def find_scores(predict_out: str | os.PathLike[str]) -> dict[str, Path]:
    """``{slide_id: path}`` of the score files of a ``wsi-mil predict`` output (``OUT/scores/*.h5``).

    Also accepts the ``scores`` folder itself.
    """
    root = Path(predict_out)
    folder = root / "scores" if (root / "scores").is_dir() else root
    if not folder.is_dir():
        raise BagFileError(
            f"No scores folder at {root}: give the --out folder of `wsi-mil predict` (it holds scores/<slide_id>.h5)."
        )
    return {p.stem: p for p in sorted(folder.glob("*.h5")) if not p.name.startswith(".")}


def load_scores(path: str | os.PathLike[str]) -> SlideScores:
    """Read and check one score file; raise :class:`BagFileError` naming the slide when it is inconsistent."""
    p = Path(path)
    where = f"Scores of slide '{p.stem}' ({p})"
    with open_for_reading(p, where, "Run `wsi-mil predict` again for this slide.") as fh:
        missing = [d for d in REQUIRED_DATASETS if d not in fh]
        missing_attrs = [a for a in REQUIRED_ATTRS if a not in fh.attrs]
        if missing or missing_attrs:
            raise BagFileError(
                f"{where} lacks {', '.join(missing + [f'attribute {a}' for a in missing_attrs])}; it was not written "
                f"by `wsi-mil predict`, or not completely ({written_by(fh.attrs)}). Run predict again."
            )
        coords = np.asarray(fh["coords"][()])
        attention = np.asarray(fh["attention"][()], dtype=np.float64)
        probs = np.asarray(fh["instance_probabilities"][()], dtype=np.float32)
        attrs = {k: fh.attrs[k] for k in fh.attrs}
    class_names = tuple(str(c) for c in _json_list(attrs["class_names"], "class_names", where))
    bag_probs = tuple(float(v) for v in _json_list(attrs["bag_probabilities"], "bag_probabilities", where))
    n = coords.shape[0] if coords.ndim >= 1 else 0
    if coords.size == 0:
        coords = np.zeros((0, 2), np.int64)
        n = 0
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise BagFileError(f"{where}: coords must have shape (N, 2), got {coords.shape}.")
    if probs.size == 0 and n == 0:
        probs = np.zeros((0, len(class_names)), np.float32)
    problems = []
    if attention.shape != (n,):
        problems.append(f"attention has shape {attention.shape}")
    if probs.ndim != 2 or probs.shape[0] != n:
        problems.append(f"instance_probabilities has shape {probs.shape}")
    elif probs.shape[1] != len(class_names):
        problems.append(f"instance_probabilities has {probs.shape[1]} classes but class_names lists {len(class_names)}")
    if len(bag_probs) != len(class_names):
        problems.append(f"bag_probabilities has {len(bag_probs)} values for {len(class_names)} classes")
    if problems:
        raise BagFileError(
            f"{where}: {'; '.join(problems)} for {n} tile coordinates. The file is inconsistent; run predict again."
        )
    if n and not (np.isfinite(attention).all() and np.isfinite(probs).all()):
        raise BagFileError(f"{where}: attention or probabilities hold NaN/inf. Check the features and run predict again.")
    if n and abs(float(attention.sum()) - 1.0) > 1e-3:
        logger.warning("%s: attention sums to %.6f, not 1", where, float(attention.sum()))
    if n and bool((coords < 0).all()):
        raise BagFileError(
            f"{where}: the tiles have no coordinates (-1): the features came without them (e.g. CLAM .pt files). "
            "Heatmaps need tile positions; extract features with `wsi-mil extract` (or a layout with coords)."
        )
    # predict writes unknown numbers as -1 / NaN (features from other tools may lack the tile spec).
    slide_mpp = positive_float(attrs.get("slide_mpp"))
    tile_mpp = positive_float(attrs.get("mpp"))
    tile_px = positive_float(attrs.get("tile_px"))
    footprint = positive_float(attrs.get("footprint_px"))
    if footprint is None and tile_px is not None and tile_mpp is not None and slide_mpp is not None:
        footprint = tile_px * tile_mpp / slide_mpp
    if footprint is None or tile_px is None or tile_mpp is None:
        raise BagFileError(
            f"{where}: the tile size is unknown (tile_px {attrs.get('tile_px')}, mpp {attrs.get('mpp')}, "
            f"footprint_px {attrs.get('footprint_px')}): the features do not record their tile spec. Extract them "
            "with `wsi-mil extract`, which records it."
        )
    return SlideScores(
        slide_id=_text(attrs.get("slide_id", p.stem)) or p.stem,
        coords=coords.astype(np.int64, copy=False),
        attention=attention,
        instance_probabilities=probs,
        class_names=class_names,
        bag_probabilities=bag_probs,
        predicted_class=_text(attrs["predicted_class"]),
        label=_text(attrs.get("label", "")),
        model=_text(attrs.get("model", attrs.get("model_name", ""))),
        n_checkpoints=int(attrs.get("n_checkpoints", 1)),
        tile_px=int(round(tile_px)),
        mpp=tile_mpp,
        footprint_px=footprint,
        slide_mpp=slide_mpp,
        encoder_name=_text(attrs.get("encoder_name", "")),
        path=p,
        scored_by=_text(attrs.get("scored_by", "")),
        slide_fingerprint=_text(attrs.get("slide_fingerprint", "")),
    )


def _number_or_unknown(value: float | None, unknown: float) -> float | int:
    """A number as stored: ``unknown`` (-1 or NaN) for ``None``; integral values as ``int``."""
    if value is None:
        return unknown
    f = float(value)
    return int(f) if f.is_integer() else f


def write_scores(
    path: str | os.PathLike[str],
    *,
    slide_id: str,
    coords: np.ndarray,
    attention: np.ndarray,
    instance_probabilities: np.ndarray,
    class_names: Sequence[str],
    bag_probabilities: Sequence[float] | np.ndarray,
    tile_px: int | None,
    mpp: float | None,
    footprint_px: float | None,
    slide_mpp: float | None,
    predicted_class: str | None = None,
    label: str = "",
    model: str = "loss_attention",
    n_checkpoints: int = 1,
    encoder_name: str = "",
    source_feature_file: str = "",
    scored_by: str = "",
    slide_fingerprint: str = "",
) -> Path:
    """Write one slide's score file (the layout above) atomically; the one writer of this format.

    Unknown numbers (features from other tools may lack the tile spec) are written as -1 (``tile_px``,
    ``footprint_px``) or NaN (``mpp``, ``slide_mpp``).
    """
    from wsi_mil import __version__

    dest = Path(path)
    if predicted_class is None:
        predicted_class = class_names[int(np.argmax(bag_probabilities))]
    attrs = {
        "slide_id": slide_id,
        "class_names": json.dumps(list(class_names)),
        "bag_probabilities": json.dumps([float(v) for v in bag_probabilities]),
        "predicted_class": predicted_class,
        "label": label,
        "model": model,
        "model_name": model,
        "n_checkpoints": int(n_checkpoints),
        "tile_px": -1 if tile_px is None else int(tile_px),
        "mpp": math.nan if mpp is None else float(mpp),
        "footprint_px": _number_or_unknown(footprint_px, -1),
        "slide_mpp": math.nan if slide_mpp is None else float(slide_mpp),
        "encoder_name": encoder_name,
        "source_feature_file": source_feature_file,
        "wsi_mil_version": __version__,
    }
    if scored_by:
        attrs["scored_by"] = scored_by
    if slide_fingerprint:
        attrs["slide_fingerprint"] = slide_fingerprint
    try:
        with atomic_path(dest, suffix=".h5") as tmp, h5_open(tmp, "w") as fh:
            fh.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(-1, 2))
            fh.create_dataset("attention", data=np.asarray(attention, np.float32))
            fh.create_dataset(
                "instance_probabilities",
                data=np.asarray(instance_probabilities, np.float32).reshape(-1, len(class_names)),
            )
            for key, value in attrs.items():
                fh.attrs[key] = value
    except OSError as exc:
        raise as_output_error(exc, dest.parent) from exc
    return dest

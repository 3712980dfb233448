"""``wsi-mil predict``: apply one or more checkpoints (e.g. the folds of a run) to feature bags.

Outputs in ``OUT``::

    predictions.csv      slide_id,case_id,label,prob_<class>...,predicted,n_tiles
                         (probabilities averaged over the checkpoints; case_id/label empty without --labels)
    scores/<slide_id>.h5 per-tile read-outs for heatmaps (written atomically):
        coords                  int64   [N, 2]  level-0 top-left x, y (-1 when the layout has none)
        attention               float32 [N]     averaged over checkpoints, sums to 1
        instance_probabilities  float32 [N, K]  each tile's class probabilities from the shared classifier
        attributes: slide_id, class_names (JSON list), bag_probabilities (JSON list), predicted_class,
                    label ("" when unknown), model (and model_name, the same), n_checkpoints, tile_px, mpp, footprint_px,
                    slide_mpp, encoder_name, source_feature_file (unknown numbers: -1 / NaN, text: "")
    predict.json         checkpoints, classes, counts, skipped slides
    metrics.json         with --labels: metrics with bootstrap CIs over the labelled, predicted slides
                         ("labelled", the intervals resample cases) and over their cases ("labelled_cases",
                         a case's probability is the mean of its slides'), and how they were computed

Features that do not fit the checkpoints' feature spec are refused before anything is predicted (R24).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_mil import __version__
from wsi_mil.cohort.datasets import (
    BagInfo,
    check_spec,
    discover_features,
    read_coords,
    read_features,
    scan_bags,
    spec_differences,
)
from wsi_mil.cohort.labels import read_labels
from wsi_mil.cohort.metrics import describe_statistics, format_metrics_table, slide_and_case_metrics
from wsi_mil.cohort.scoring import ScoringPlan
from wsi_mil.config.train import PredictConfig, resolve_device
from wsi_mil.errors import CheckpointError, InputError, SlideIdentityError
from wsi_mil.store import atomic_write_json, atomic_write_text, ensure_writable_dir
from wsi_mil.store.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoints
from wsi_mil.store.score_file import write_scores

logger = logging.getLogger(__name__)

__all__ = ["BagReadout", "PredictResult", "predict_bag", "run_predict"]


@dataclass
class BagReadout:
    """Read-outs of one bag averaged over the checkpoints (written as a score file by :func:`run_predict`)."""

    bag_probabilities: np.ndarray  # [K] float64
    attention: np.ndarray  # [N] float32
    instance_probabilities: np.ndarray  # [N, K] float32


@dataclass
class PredictResult:
    out_dir: Path
    classes: list[str]
    n_predicted: int
    skipped: dict[str, list[str]] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    case_metrics: dict[str, Any] | None = None
    case_level_undefined: str | None = None
    #: slides per kind of scorer: ``held_out``, ``ensemble`` (of checkpoints that never saw it), ``in_sample``
    scored_by: dict[str, int] = field(default_factory=dict)
    #: True when some slide was scored by a model that trained on it (``ensemble_all``)
    in_sample: bool = False

    @property
    def exit_code(self) -> int:
        """1 when a slide could not be predicted because of bad features (NaN/Inf), else 0."""
        return 1 if self.skipped.get("non_finite") else 0

    def table(self) -> str:
        how = ", ".join(f"{n} {_SCORED_BY_WORDS.get(k, k)}" for k, n in sorted(self.scored_by.items()))
        lines = [f"predicted {self.n_predicted} slide(s) into {self.out_dir}" + (f": {how}" if how else "")]
        for reason, ids in self.skipped.items():
            if ids:
                why = " (every checkpoint trained on them; --ensemble-all scores them in-sample)" if reason == "trained_on" else ""
                lines.append(
                    f"skipped ({reason}): {len(ids)}: {', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''}{why}"
                )
        if self.metrics is not None:
            name = "IN-SAMPLE (trained on)" if self.in_sample else "out of fold"
            rows = [(f"{name} (slides)", self.metrics), (f"{name} (cases)", self.case_metrics)]
            lines.append(format_metrics_table(rows))
            if self.case_level_undefined:
                lines.append(f"case-level metrics undefined: {self.case_level_undefined}")
        return "\n".join(lines)


_SCORED_BY_WORDS = {
    "held_out": "by the fold model that held them out",
    "ensemble": "by the checkpoints' average (never seen in training)",
    "in_sample": "IN-SAMPLE by models that trained on them",
}


def _consistent(checkpoints: Sequence[Checkpoint]) -> None:
    first = checkpoints[0]
    for other in checkpoints[1:]:
        if other.classes != first.classes:
            raise CheckpointError(
                f"checkpoints disagree on the classes: {first.path} has {first.classes}, {other.path} has "
                f"{other.classes}; average only checkpoints of one task."
            )
        diffs = spec_differences(first.feature_spec, other.feature_spec)
        if diffs:
            raise CheckpointError(
                f"checkpoints were trained on different features ({first.path} vs {other.path}): {'; '.join(diffs)}."
            )


def predict_bag(models: Sequence[torch.nn.Module], features: torch.Tensor) -> BagReadout:
    """Average bag probabilities, attention and tile probabilities of ``models`` on one bag ``[n, d]``."""
    bag = None
    attention = None
    instances = None
    with torch.inference_mode():
        for model in models:
            out = model(features)
            probs = out.bag_probabilities().double()
            att = out.attention.double()
            inst = out.instance_probabilities()
            if inst is None:
                raise CheckpointError(f"model {type(model).__name__} gives no per-tile probabilities")
            inst = inst.double()
            bag = probs if bag is None else bag + probs
            attention = att if attention is None else attention + att
            instances = inst if instances is None else instances + inst
    assert bag is not None and attention is not None and instances is not None
    n = len(models)
    return BagReadout(
        bag_probabilities=(bag / n).cpu().numpy(),
        attention=(attention / n).float().cpu().numpy(),
        instance_probabilities=(instances / n).float().cpu().numpy(),
    )


def run_predict(
    features: str | os.PathLike[str],
    checkpoints: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    config: PredictConfig | None = None,
    labels_csv: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
    *,
    ensemble_all: bool = False,
) -> PredictResult:
    """Predict every bag under ``features``, out of fold (see :mod:`wsi_mil.cohort.scoring`).

    A slide that the checkpoints' training run listed is scored by the fold model that held it out; a
    slide the run never saw by the average of the checkpoints; a slide every checkpoint trained on is
    skipped (``skipped["trained_on"]``). ``ensemble_all`` scores every slide with every checkpoint (for
    deployment); metrics over slides a model trained on are then marked in-sample, with a warning.

    Args:
        features: a feature folder or one bag file (see :mod:`~wsi_mil.cohort.datasets`).
        checkpoints: ``model.json``/``model.safetensors`` files, fold folders, or training run folders.
        out_dir: output folder (see the module docstring).
        labels_csv: optional label table; adds ``label``/``case_id`` and ``metrics.json``.

    Raises:
        CheckpointError, FeatureSpecMismatchError (R24), BagFileError, InputError, LabelTableError.
    """
    from wsi_mil.progress import progress_bar

    cfg = config or PredictConfig()
    t_start = time.perf_counter()
    sidecars = resolve_checkpoints(checkpoints)
    loaded = [load_checkpoint(s) for s in sidecars]
    _consistent(loaded)
    classes = loaded[0].classes
    spec = loaded[0].feature_spec
    names = sorted({c.model_name for c in loaded})
    model_name = "+".join(names)
    logger.info("%d checkpoint(s) of %s, classes %s", len(loaded), model_name, classes)
    plan = ScoringPlan(sidecars, [c.meta for c in loaded], ensemble_all=ensemble_all)

    folder = discover_features(features)
    label_of: dict[str, str] = {}
    case_of: dict[str, str] = {}
    labelled_without_features: list[str] = []
    if labels_csv is not None:
        table = read_labels(
            labels_csv, cfg.labels.id_col, cfg.labels.label_col, cfg.labels.case_col, classes=classes, min_classes=1
        )
        label_of, case_of = table.label_of(), table.case_of()
        labelled_without_features = [s for s in table.slide_ids if s not in folder.sources]
        if labelled_without_features:
            logger.warning(
                "%d labelled slide(s) have no feature file: %s",
                len(labelled_without_features),
                labelled_without_features[:10],
            )
    # Under --strict every bag whose writer did not check its values (values_checked=finite) is scanned for
    # NaN/Inf before anything is written; every bag is also checked as it is read for prediction (without
    # --strict, that is the only check: one read pass instead of two).
    scan = scan_bags(list(folder.sources.values()), check_finite=cfg.strict, strict=cfg.strict, progress=progress)
    infos: list[BagInfo] = list(scan.infos.values())
    check_spec(spec, infos, what=f"the checkpoint {sidecars[0]}")
    if not infos:
        raise InputError(f"no usable feature bags under {folder.root}.")

    conflicts = plan.identity_conflicts(
        {info.source.slide_id: str(info.attrs.get("slide_fingerprint", "") or "") for info in infos}
    )
    if conflicts:
        what = (
            f"{len(conflicts)} bag(s) come from other slide files than the slides the training run used under "
            f"the same id: {', '.join(conflicts[:5])}{' ...' if len(conflicts) > 5 else ''}"
        )
        if not cfg.ignore_slide_identity:
            raise SlideIdentityError(
                f"{what}. Scored as the run's slides they would be called held-out wrongly. Rename the new "
                "slides (the id is the file name), or, for re-scanned slides, pass --ignore-slide-identity."
            )
        logger.warning("%s; scored as the run's slides (ignore_slide_identity)", what)
    out = ensure_writable_dir(out_dir)
    device = torch.device(resolve_device(cfg.device))
    models = [c.model.to(device).eval() for c in loaded]
    rows: list[dict[str, Any]] = []
    trained_on: list[str] = []
    in_sample: list[str] = []
    y_true: list[int] = []
    y_prob: list[np.ndarray] = []
    y_case: list[str] = []
    with progress_bar(total=len(infos), desc="predicting", unit="slide", enable=progress) as bar:
        for info in infos:
            source = info.source
            scorer = plan.scorer(source.slide_id)
            if scorer is None:
                trained_on.append(source.slide_id)
                bar.update(1)
                continue
            array = read_features(source)
            if not np.isfinite(array).all():
                logger.warning("slide %r holds NaN/Inf features; skipped (re-extract it)", source.slide_id)
                scan.non_finite.append(source.slide_id)
                bar.update(1)
                continue
            x = torch.from_numpy(array).to(device)
            del array
            scores = predict_bag([models[i] for i in scorer.indices], x)
            del x
            coords = read_coords(source, info.n_tiles)
            predicted = classes[int(np.argmax(scores.bag_probabilities))]
            label = label_of.get(source.slide_id, "")
            write_scores(
                out / "scores" / f"{source.slide_id}.h5",
                slide_id=source.slide_id,
                coords=coords,
                attention=scores.attention,
                instance_probabilities=scores.instance_probabilities,
                class_names=classes,
                bag_probabilities=scores.bag_probabilities,
                predicted_class=predicted,
                label=label,
                model=model_name,
                n_checkpoints=len(scorer.indices),
                tile_px=info.spec.tile_px,
                mpp=info.spec.mpp,
                footprint_px=info.footprint_px,
                slide_mpp=info.slide_mpp,
                encoder_name=info.spec.encoder_name or "",
                source_feature_file=str(source.path),
                scored_by=scorer.label,
                slide_fingerprint=str(info.attrs.get("slide_fingerprint", "") or ""),
            )
            rows.append(
                {
                    "slide_id": source.slide_id,
                    "case_id": case_of.get(source.slide_id, ""),
                    "label": label,
                    **{f"prob_{c}": float(p) for c, p in zip(classes, scores.bag_probabilities, strict=True)},
                    "predicted": predicted,
                    "n_tiles": info.n_tiles,
                    "scored_by": scorer.label,
                }
            )
            if scorer.in_sample:
                in_sample.append(source.slide_id)
            if label:
                y_true.append(classes.index(label))
                y_prob.append(scores.bag_probabilities)
                y_case.append(case_of[source.slide_id])
            bar.update(1)

    columns = ["slide_id", "case_id", "label", *(f"prob_{c}" for c in classes), "predicted", "n_tiles", "scored_by"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(out / "predictions.csv", buf.getvalue())

    metrics = cases = undefined = None
    if y_true:
        boot = cfg.metrics
        metrics, cases, undefined = slide_and_case_metrics(
            np.asarray(y_true), np.stack(y_prob), y_case, boot.n_bootstrap, boot.ci_level, seed=0, classes=classes
        )
        labelled_in_sample = [s for s in in_sample if label_of.get(s)]
        if labelled_in_sample:
            logger.warning(
                "IN-SAMPLE metrics: %d of %d labelled slide(s) were scored by models that trained on them "
                "(--ensemble-all); they say nothing about unseen slides. Use the out-of-fold scores (drop "
                "--ensemble-all) for any figure you report.", len(labelled_in_sample), len(y_true),
            )
        atomic_write_json(
            out / "metrics.json",
            {
                "classes": classes,
                "scoring": "in_sample" if labelled_in_sample else "out_of_fold",
                "in_sample_slides": labelled_in_sample,
                "statistics": describe_statistics(metrics["resampled"], boot.n_bootstrap, boot.ci_level),
                "labelled": metrics,
                "labelled_cases": cases,
                "case_level_undefined": undefined,
            },
        )
    skipped = {"empty": scan.empty, "non_finite": scan.non_finite}
    if trained_on:
        skipped["trained_on"] = trained_on
    atomic_write_json(
        out / "predict.json",
        {
            "checkpoints": [str(s) for s in sidecars],
            "model_name": model_name,
            "classes": classes,
            "feature_spec": spec.to_json(),
            "feature_folder": str(folder.root),
            "layout": folder.layout,
            "n_feature_files": len(folder),
            "n_predicted": len(rows),
            "skipped": skipped,
            "labelled_without_features": labelled_without_features,
            "device": str(device),
            "seconds": round(time.perf_counter() - t_start, 2),
            "wsi_mil_version": __version__,
        },
    )
    return PredictResult(
        out_dir=out,
        classes=classes,
        n_predicted=len(rows),
        skipped=skipped,
        metrics=metrics,
        case_metrics=cases,
        case_level_undefined=undefined,
        scored_by=dict(Counter(r["scored_by"].split(":")[0] if not r["scored_by"].startswith("in_sample") else "in_sample"
                               for r in rows)),
        in_sample=bool(in_sample),
    )

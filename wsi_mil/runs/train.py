"""``wsi-mil train``: cross-validated MIL training on a folder of feature bags and a label table.

Outputs in the run folder ``RUN``::

    config.yaml        the resolved TrainConfig
    classes.json       {"classes": [...], "class_index": {name: i}}  (sorted labels unless configured)
    splits.csv         slide_id,case_id,label,fold,split  (split: train / val / test)
    history.jsonl      one JSON object per fold and epoch: every loss term, validation metrics, timing
    fold_<k>/          model.safetensors + model.json (best validation epoch of fold k)
    predictions.csv    out-of-fold: slide_id,case_id,label,prob_<class>...,predicted,fold
    metrics.json       per fold and pooled out-of-fold metrics with bootstrap CIs, slide- and case-level
                       (a case's probability is the mean of its slides'; the intervals resample cases),
                       how they were computed ("statistics"), cohort report; each fold's "objective":
                       the loss settings its model trained with

Selection is honest: the best epoch of a fold is chosen on its validation part only; its test part is
predicted once, by the restored best model.

One module because the cross-validation run, its per-fold resume state and its result tables
share one fold context; the model, objective and training loop live in :mod:`wsi_mil.mil`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from wsi_mil import __version__
from wsi_mil.cohort.datasets import LazyBagDataset, cohort_spec, discover_features, scan_bags
from wsi_mil.cohort.labels import LabelTable, read_labels
from wsi_mil.cohort.metrics import (
    METRIC_NAMES,
    describe_statistics,
    format_metrics_table,
    slide_and_case_metrics,
)
from wsi_mil.cohort.scoring import SLIDE_FINGERPRINTS
from wsi_mil.cohort.splits import FoldSplit, make_splits, read_splits, write_splits
from wsi_mil.config import write_config
from wsi_mil.config.train import TrainConfig, resolve_device
from wsi_mil.errors import ConfigError, InputError
from wsi_mil.mil import (
    Trainer,
    TrainerCallback,
    TrainerConfig,
    TrainingError,
    create_model,
    list_models,
    seed_everything,
)
from wsi_mil.runs.train_state import claim_run, load_fold, prepare_run_folder, run_key, save_fold
from wsi_mil.store import atomic_write_json, atomic_write_text
from wsi_mil.store.bag_file import FeatureSpec
from wsi_mil.store.checkpoint import save_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["TrainResult", "run_train"]

_RUN_OUTPUTS = (
    "config.yaml", "classes.json", "splits.csv", "slide_fingerprints.json", "history.jsonl", "train.log",
    "predictions.csv", "metrics.json",
)


@dataclass
class TrainResult:
    """What :func:`run_train` produced (everything is also on disk in ``out_dir``)."""

    out_dir: Path
    classes: list[str]
    metrics: dict[str, Any]
    fold_summaries: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        """Per-fold and pooled out-of-fold metrics of slides and of cases, value [95% CI], as plain text."""
        rows: list[tuple[str, dict[str, Any] | None]] = []
        for f in self.metrics["folds"]:
            rows += [(f"fold {f['fold']} (slides)", f["test"]), (f"fold {f['fold']} (cases)", f.get("test_cases"))]
        rows.append(("pooled OOF (slides)", self.metrics["pooled_out_of_fold"]))
        rows.append(("pooled OOF (cases)", self.metrics.get("pooled_out_of_fold_cases")))
        text = format_metrics_table(rows)
        if self.metrics.get("case_level_undefined"):
            text += "\ncase-level metrics undefined: " + self.metrics["case_level_undefined"]
        mean = self.metrics.get("fold_mean", {})
        parts = [
            f"{name} {m['mean']:.3f} ± {m['std']:.3f}"
            for name, m in mean.items()
            if m.get("mean") is not None and m.get("std") is not None
        ]
        if parts:
            text += "\nfold mean ± sd: " + ", ".join(parts)
        return text


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class _HistoryWriter(TrainerCallback):
    """Trainer callback: one JSON line per epoch into ``history.jsonl`` and one readable line into
    ``train.log`` (both flushed, so they can be tailed); the terminal gets a progress bar instead."""

    def __init__(self, handle: IO[str], fold: int, log: IO[str] | None = None) -> None:
        self.handle = handle
        self.fold = fold
        self.log = log
        self.history_lines: list[str] = []
        self.log_lines: list[str] = []

    def on_epoch_end(self, trainer: Any, record: dict[str, float]) -> None:
        row: dict[str, Any] = {"fold": self.fold}
        row.update({k: _finite_or_none(float(v)) for k, v in record.items()})
        row["epoch"] = int(record["epoch"])
        self.history_lines.append(json.dumps(row))
        self.handle.write(self.history_lines[-1] + "\n")
        self.handle.flush()
        terms = ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch")
        self.log_lines.append(f"fold {self.fold} epoch {int(record['epoch'])}: {terms}")
        if self.log is not None:
            self.log.write(self.log_lines[-1] + "\n")
            self.log.flush()


class _ProgressBar(TrainerCallback):
    """Trainer callback: a tqdm bar per epoch (off when stderr is not a terminal)."""

    def __init__(self, fold: int, n_folds: int, epochs: int, enable: bool | None) -> None:
        self.fold, self.n_folds, self.epochs, self.enable = fold, n_folds, epochs, enable
        self.bar: Any = None

    def on_epoch_start(self, trainer: Any, epoch: int, n_steps: int) -> None:
        from wsi_mil.progress import progress_bar

        desc = f"fold {self.fold + 1}/{self.n_folds} epoch {epoch + 1}/{self.epochs}"
        self.bar = progress_bar(total=n_steps, desc=desc, unit="step", enable=self.enable)

    def on_batch_end(self, trainer: Any, step: int, n_bags: int) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_epoch_end(self, trainer: Any, record: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_fit_end(self, trainer: Any, result: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _report_unmatched(table: LabelTable, feature_ids: set[str], strict: bool) -> tuple[list[str], list[str]]:
    """R18: labelled slides without features and feature files without a label."""
    labelled = set(table.slide_ids)
    no_features = [s for s in table.slide_ids if s not in feature_ids]
    no_label = sorted(feature_ids - labelled)
    messages = []
    if no_features:
        messages.append(
            f"{len(no_features)} of {len(labelled)} labelled slides have no feature file: {_ids(no_features)}"
        )
    if no_label:
        messages.append(
            f"{len(no_label)} of {len(feature_ids)} feature files have no label: {_ids(no_label)}"
        )
    if messages:
        if strict:
            raise InputError("; ".join(messages) + ". Fix the label table or the feature folder (or drop --strict).")
        for message in messages:
            logger.warning("%s; they are left out.", message)
    return no_features, no_label


def _ids(ids: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(s) for s in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _class_weights(config: TrainConfig, labels: list[int], n_classes: int) -> tuple[float, ...] | None:
    setting = config.training.class_weights
    if setting is None:
        return None
    if setting == "balanced":
        counts = Counter(labels)
        n = len(labels)
        return tuple(n / (n_classes * counts[c]) if counts[c] else 1.0 for c in range(n_classes))
    if len(setting) != n_classes:
        raise InputError(f"training.class_weights has {len(setting)} values for {n_classes} classes")
    return tuple(float(w) for w in setting)


def _summary_stats(fold_metrics: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in METRIC_NAMES:
        values = [m[name]["value"] for m in fold_metrics if m[name]["value"] is not None]
        out[name] = {
            "mean": float(np.mean(values)) if values else None,
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "n_folds": len(values),
        }
    return out


def run_train(
    features: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: TrainConfig | None = None,
    splits_csv: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> TrainResult:
    """Train one model per fold and evaluate it out of fold (see the module docstring for the outputs).

    Args:
        features: a feature folder (wsi-mil, CLAM or TRIDENT layout; see :mod:`~wsi_mil.cohort.datasets`).
        labels_csv: the label table (columns from ``config.labels``).
        out_dir: the run folder; a folder holding this very run is resumed (finished folds kept), one
            holding another run is refused unless ``overwrite`` (see :mod:`~wsi_mil.runs.train_state`).
        config: :class:`TrainConfig` (defaults when ``None``).
        splits_csv: a long-format splits file to use instead of making splits (validated, R20).
        progress: show progress bars (``None``: only on a terminal).

    Raises:
        LabelTableError, InputError, SplitLeakageError, BagFileError, FeatureSpecMismatchError,
        OutputConflictError, ConfigError, TrainingError.
    """
    cfg = config or TrainConfig()
    if cfg.model.name not in list_models():
        raise ConfigError(f"unknown MIL model {cfg.model.name!r}; choose one of: {', '.join(list_models())}")
    out = Path(out_dir)
    t_start = time.perf_counter()
    prepare_run_folder(out, _RUN_OUTPUTS, overwrite)

    table = read_labels(
        labels_csv, cfg.labels.id_col, cfg.labels.label_col, cfg.labels.case_col, cfg.labels.classes
    )
    classes = table.classes
    class_index = table.class_index
    label_of, case_of = table.label_of(), table.case_of()
    folder = discover_features(features)
    logger.info("%d feature files (%s layout) in %s", len(folder), folder.layout, folder.root)
    no_features, no_label = _report_unmatched(table, set(folder.sources), cfg.strict)
    matched = [folder.sources[s] for s in table.slide_ids if s in folder.sources]
    if not matched:
        raise InputError(
            f"no slide of the label table {table.source} has a feature file in {folder.root}; the slide ids "
            "must equal the feature file names without extension."
        )
    scan = scan_bags(matched, check_finite=cfg.check_finite, strict=cfg.strict, progress=progress, recheck=cfg.recheck)
    infos = scan.infos
    spec = cohort_spec(list(infos.values()))
    usable = [s for s in table.slide_ids if s in infos]
    present = {label_of[s] for s in usable}
    if len(present) < 2:
        raise InputError(f"the usable slides hold a single class {sorted(present)}; training needs two or more.")
    missing_classes = [c for c in classes if c not in present]
    if missing_classes:
        logger.warning("classes without any usable slide: %s", missing_classes)

    if splits_csv is not None:
        folds = read_splits(splits_csv, table.slide_ids, case_of, usable=set(usable))
    else:
        folds = make_splits(
            usable,
            [case_of[s] for s in usable],
            [class_index[label_of[s]] for s in usable],
            n_folds=cfg.splits.folds,
            val_fraction=cfg.splits.val_fraction,
            seed=cfg.seed,
            class_names=classes,
        )
    run_id = run_key(
        cfg, {s: (infos[s].n_tiles, spec.feature_dim, _file_bytes(infos[s].source.path), infos[s].attrs) for s in usable},
        folds,
    )
    claim_run(out, run_id)
    write_splits(out / "splits.csv", folds, case_of, label_of)
    atomic_write_json(  # which slide file each id was: predict checks bags against it
        out / SLIDE_FINGERPRINTS,
        {s: infos[s].attrs.get("slide_fingerprint") or None for s in usable},
    )
    finished = {f.fold: load_fold(out, f.fold, run_id) for f in folds}
    if all(finished.values()) and (out / "metrics.json").is_file():
        logger.info("%s holds this run, finished: nothing to train (--overwrite starts over)", out)
        kept = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
        return TrainResult(out_dir=out, classes=classes, metrics=kept, fold_summaries=list(kept["folds"]))
    if any(finished.values()):
        logger.info("resuming %s: folds %s finished, training the rest", out, sorted(k for k, v in finished.items() if v))
    atomic_write_json(out / "classes.json", {"classes": classes, "class_index": class_index})
    write_config(cfg, out / "config.yaml")

    device = resolve_device(cfg.training.device)
    model_kwargs: dict[str, Any] = {"hidden_dims": tuple(cfg.model.hidden_dims), "dropout": cfg.model.dropout}
    if cfg.model.standardize_features:
        model_kwargs["standardize_features"] = True
    model_kwargs.update(cfg.model.options)
    n_tiles = {s: infos[s].n_tiles for s in usable}

    context = _FoldContext(
        cfg=cfg, n_folds=len(folds), device=device, model_kwargs=model_kwargs, spec=spec, classes=classes,
        class_of={s: class_index[label_of[s]] for s in usable}, case_of=case_of,
        sources={s: infos[s].source for s in usable}, n_tiles=n_tiles, progress=progress, out=out,
    )

    oof_rows: list[dict[str, Any]] = []
    oof_labels: list[int] = []
    oof_probs: list[np.ndarray] = []
    fold_reports: list[dict[str, Any]] = []
    history_path = out / "history.jsonl"
    with open(history_path, "w", encoding="utf-8") as history, open(out / "train.log", "w", encoding="utf-8") as log:
        context.log = log
        for fold in folds:
            done = finished[fold.fold]
            if done is None:
                try:
                    report, history_lines, log_lines = _train_fold(fold, context, history)
                except TrainingError as exc:
                    if not scan.trusted or "loss became" not in str(exc):
                        raise
                    raise TrainingError(
                        f"{exc} {len(scan.trusted)} bag(s) were not scanned for NaN/Inf because their writer had "
                        "checked them; if one was changed since, `wsi-mil train --recheck` finds it."
                    ) from exc
                save_fold(out, fold.fold, run_id, report, history_lines, log_lines)
            else:
                report, history_lines, log_lines = done
                history.writelines(line + "\n" for line in history_lines)
                log.writelines(line + "\n" for line in log_lines)
            for slide_id, probs in report.pop("_predictions"):
                oof_labels.append(class_index[label_of[slide_id]])
                oof_probs.append(probs)
                oof_rows.append(
                    {
                        "slide_id": slide_id,
                        "case_id": case_of[slide_id],
                        "label": label_of[slide_id],
                        **{f"prob_{c}": float(probs[i]) for i, c in enumerate(classes)},
                        "predicted": classes[int(np.argmax(probs))],
                        "fold": fold.fold,
                    }
                )
            fold_reports.append(report)

    boot = cfg.metrics
    pooled, pooled_cases, case_undefined = slide_and_case_metrics(
        np.asarray(oof_labels),
        np.stack(oof_probs),
        [row["case_id"] for row in oof_rows],
        boot.n_bootstrap,
        boot.ci_level,
        seed=cfg.seed,
        classes=classes,
    )
    metrics: dict[str, Any] = {
        "classes": classes,
        "positive_class": classes[1] if len(classes) == 2 else None,
        "auc_definition": "binary: of the positive class (index 1); multi-class: macro one-vs-rest",
        "statistics": describe_statistics(pooled["resampled"], boot.n_bootstrap, boot.ci_level),
        "pooled_out_of_fold": pooled,
        "pooled_out_of_fold_cases": pooled_cases,
        "case_level_undefined": case_undefined,
        "fold_mean": _summary_stats([f["test"] for f in fold_reports]),
        "folds": fold_reports,
        "cohort": {
            "layout": folder.layout,
            "feature_folder": str(folder.root),
            "labels_csv": str(labels_csv),
            "splits_csv": None if splits_csv is None else str(splits_csv),
            "n_labelled": len(table),
            "n_feature_files": len(folder),
            "n_used": len(usable),
            "n_cases_used": len({case_of[s] for s in usable}),
            "class_counts_used": {c: sum(1 for s in usable if label_of[s] == c) for c in classes},
            "labelled_without_features": no_features,
            "features_without_labels": no_label,
            "empty_bags": scan.empty,
            "non_finite_bags": scan.non_finite,
        },
        "feature_spec": spec.to_json(),
        "model": {"name": cfg.model.name, **model_kwargs, "hidden_dims": list(cfg.model.hidden_dims)},
        "device": device,
        "seconds": round(time.perf_counter() - t_start, 2),
        "wsi_mil_version": __version__,
    }
    _write_predictions(out / "predictions.csv", oof_rows, classes)
    atomic_write_json(out / "metrics.json", metrics)
    logger.info("training run written to %s", out)
    return TrainResult(out_dir=out, classes=classes, metrics=metrics, fold_summaries=fold_reports)


@dataclass
class _FoldContext:
    """What every fold shares."""

    cfg: TrainConfig
    n_folds: int
    device: str
    model_kwargs: dict[str, Any]
    spec: FeatureSpec
    classes: list[str]
    class_of: dict[str, int]
    case_of: dict[str, str]
    sources: dict[str, Any]
    n_tiles: dict[str, int]
    progress: bool | None
    out: Path
    #: ``train.log`` of the run: every epoch's line (the terminal shows progress bars)
    log: IO[str] | None = None

    def dataset(self, ids: list[str], subsample: bool) -> LazyBagDataset:
        return LazyBagDataset(
            [self.sources[s] for s in ids],
            [self.class_of[s] for s in ids],
            n_tiles=[self.n_tiles[s] for s in ids],
            max_instances=self.cfg.training.max_instances if subsample else None,
        )


def _train_fold(fold: FoldSplit, ctx: _FoldContext, history: IO[str]) -> tuple[dict[str, Any], list[str], list[str]]:
    """Fit on the fold's training part (selecting on its validation part), save, predict its test part;
    return its report and its lines of ``history.jsonl`` and ``train.log``."""
    cfg, classes = ctx.cfg, ctx.classes
    opt = cfg.training
    train_labels = [ctx.class_of[s] for s in fold.train]
    has_val = bool(fold.val)
    if not has_val:
        logger.warning("fold %d has no validation slides: no early stopping, the last epoch is kept", fold.fold)
    trainer_config = TrainerConfig(
        epochs=opt.epochs,
        batch_size=opt.batch_size,
        optimizer=opt.optimizer,
        lr=opt.lr,
        weight_decay=opt.weight_decay,
        grad_clip_norm=opt.grad_clip_norm,
        recall_weight=opt.recall_weight,  # None: the model's default, as for mil.Trainer
        consistency_max=opt.consistency_max,
        rampup_epochs=opt.rampup_epochs,
        ema_beta=opt.ema_beta,
        class_weights=_class_weights(cfg, train_labels, len(classes)),
        max_instances=None,  # subsampled while reading (LazyBagDataset), with tile indices
        early_stopping_patience=opt.early_stopping_patience if has_val else None,
        monitor=opt.monitor,
        min_delta=opt.min_delta,
        seed=cfg.seed + fold.fold,
        deterministic=opt.deterministic,
        device=ctx.device,
        amp_bf16=opt.amp_bf16,
        num_workers=opt.num_workers,
    )
    seed_everything(cfg.seed + fold.fold)
    model = create_model(cfg.model.name, ctx.spec.feature_dim, len(classes), **ctx.model_kwargs)
    writer = _HistoryWriter(history, fold.fold, ctx.log)
    callbacks = [writer, _ProgressBar(fold.fold, ctx.n_folds, opt.epochs, ctx.progress)]
    trainer = Trainer(model, trainer_config, callbacks)
    logger.info(
        "fold %d (%d of %d): %d train, %d val, %d test slides",
        fold.fold,
        fold.fold + 1,
        ctx.n_folds,
        len(fold.train),
        len(fold.val),
        len(fold.test),
    )
    t0 = time.perf_counter()
    result = trainer.fit(ctx.dataset(fold.train, True), ctx.dataset(fold.val, False) if has_val else None)
    fit_seconds = time.perf_counter() - t0
    training_info = {
        "fold": fold.fold,
        "best_epoch": result.best_epoch,
        "monitor": result.monitor,
        "best_metric": _finite_or_none(result.best_metric) if result.best_metric is not None else None,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "n_train": len(fold.train),
        "n_val": len(fold.val),
        "seed": cfg.seed + fold.fold,
        "objective": asdict(trainer.objective),  # the settings resolved for this model
    }
    save_checkpoint(ctx.out / f"fold_{fold.fold}", trainer.model, classes, ctx.spec, training=training_info)
    predictions = trainer.predict(ctx.dataset(fold.test, False), return_instances=False)
    labels = np.asarray([ctx.class_of[p.key] for p in predictions])
    probs = np.stack([p.bag_probabilities for p in predictions])
    boot = cfg.metrics
    test_metrics, test_cases, _ = slide_and_case_metrics(  # undefined cases: reported for the pooled OOF
        labels,
        probs,
        [ctx.case_of[p.key] for p in predictions],
        boot.n_bootstrap,
        boot.ci_level,
        seed=cfg.seed + fold.fold,
        classes=classes,
    )
    logger.info(
        "fold %d: best epoch %s (%s=%s), test AUC %s",
        fold.fold,
        result.best_epoch,
        result.monitor,
        result.best_metric,
        test_metrics["auc"]["value"],
    )
    return {
        **training_info,
        "n_test": len(fold.test),
        "fit_seconds": round(fit_seconds, 2),
        "checkpoint": f"fold_{fold.fold}/model.json",
        "test": test_metrics,
        "test_cases": test_cases,
        "_predictions": [(p.key, p.bag_probabilities) for p in predictions],
    }, writer.history_lines, writer.log_lines


def _write_predictions(path: Path, rows: list[dict[str, Any]], classes: list[str]) -> None:
    columns = ["slide_id", "case_id", "label", *(f"prob_{c}" for c in classes), "predicted", "fold"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: (r["fold"], r["slide_id"])):
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def _file_bytes(path: Path) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:
        return -1

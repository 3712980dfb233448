"""``wsi-mil train`` and ``wsi-mil predict``: thin commands over :mod:`wsi_mil.runs.train` and :mod:`wsi_mil.runs.predict`.

Heavy modules (torch, scikit-learn, h5py) are imported inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import sys

import click

from wsi_mil.cli.common import (
    CHECKPOINT_HELP,
    config_option,
    device_option,
    ensemble_all_option,
    exit_on_error,
    features_argument,
    label_column_options,
    label_column_overrides,
    out_option,
)

__all__ = ["predict", "train"]


@click.command("train")
@features_argument
@click.option("--labels", "labels_csv", required=True, type=click.Path(dir_okay=False, exists=True), help="Label CSV: slide id, label, optional case id.")
@out_option("Run folder (checkpoints, metrics, predictions).")
@config_option("train")
@click.option("--model", default=None, help="MIL model: loss_attention (default), abmil, mean, max.")
@click.option("--folds", type=int, default=None, help="Cross-validation folds (default 5).")
@click.option("--splits", "splits_csv", type=click.Path(dir_okay=False, exists=True), default=None, help="Use this splits file (slide_id,case_id,label,fold,split) instead of making folds.")
@click.option("--epochs", type=int, default=None, help="Maximum epochs per fold (default 50; early stopping on validation).")
@click.option("--lr", type=float, default=None, help="Learning rate (default 2e-4).")
@click.option("--max-instances", type=int, default=None, help="Tiles read per training bag and step (default: all).")
@click.option("--standardize-features", is_flag=True, default=None, help="Z-score each feature with the mean and s.d. of each fold's training tiles; they are kept in the checkpoint and predict and heatmap apply them (default off).")
@click.option("--seed", type=int, default=None, help="Seed of splits, initialisation and order (default 0).")
@device_option()
@label_column_options(case_col_help="Case/patient column (default case_id; absent: one case per slide).")
@click.option("--classes", default=None, help="Comma-separated classes in class-index order, e.g. normal,tumor: a label outside them is an error naming its line (default: the labels found, sorted).")
@click.option("--strict", is_flag=True, default=None, help="Unmatched slides and NaN/Inf bags are errors, not warnings.")
@click.option("--recheck", is_flag=True, default=None, help="Scan every bag for NaN/Inf, also those whose writer already checked each value (attribute values_checked=finite) (default off: such bags are trusted and only the others are scanned).")
@click.option("--overwrite", is_flag=True, help="Replace a run already in --out.")
def train(
    features: str,
    labels_csv: str,
    out_dir: str,
    config_path: str | None,
    model: str | None,
    folds: int | None,
    splits_csv: str | None,
    epochs: int | None,
    lr: float | None,
    max_instances: int | None,
    standardize_features: bool | None,
    seed: int | None,
    device: str | None,
    id_col: str | None,
    label_col: str | None,
    case_col: str | None,
    classes: str | None,
    strict: bool | None,
    recheck: bool | None,
    overwrite: bool,
) -> None:
    """Cross-validated MIL training on feature bags (wsi-mil, CLAM or TRIDENT layout) and a label table.

    FEATURES: `wsi-mil extract` output folder (or its features/), CLAM's folder (h5_files/, pt_files/),
    or TRIDENT's features_<encoder>/ folder.
    """
    from wsi_mil.config import load_config
    from wsi_mil.config.train import TrainConfig

    with exit_on_error():
        cfg = load_config(
            TrainConfig,
            config_path,
            {
                "model.name": model,
                "splits.folds": folds,
                "training.epochs": epochs,
                "training.lr": lr,
                "training.max_instances": max_instances,
                "model.standardize_features": standardize_features,
                "training.device": device,
                "seed": seed,
                **label_column_overrides(id_col, label_col, case_col),
                "labels.classes": None if classes is None else [c.strip() for c in classes.split(",") if c.strip()],
                "strict": strict,
                "recheck": recheck,
            },
        )
        from wsi_mil.runs.train import run_train

        result = run_train(features, labels_csv, out_dir, cfg, splits_csv=splits_csv, overwrite=overwrite)
    click.echo(result.table())
    click.echo(f"run folder: {result.out_dir} (metrics.json, predictions.csv, fold_*/model.json)")


@click.command("predict")
@features_argument
@click.option("--checkpoint", "checkpoints", required=True, multiple=True, type=click.Path(exists=True), help=CHECKPOINT_HELP)
@out_option("Output folder: predictions.csv, scores/<slide_id>.h5.")
@click.option("--labels", "labels_csv", type=click.Path(dir_okay=False, exists=True), default=None, help="Optional label CSV: adds labels to the outputs and writes metrics.json.")
@config_option("predict")
@device_option()
@label_column_options(case_col_help="Case/patient column (default case_id).")
@click.option("--strict", is_flag=True, default=None, help="NaN/Inf bags are errors instead of skipped slides.")
@ensemble_all_option
@click.option("--ignore-slide-identity", is_flag=True, default=None, help="Score a bag whose slide file differs from the one the training run used under that id (a re-scanned slide) as the run's slide, with a warning; by default predict refuses.")
def predict(
    features: str,
    checkpoints: tuple[str, ...],
    out_dir: str,
    labels_csv: str | None,
    config_path: str | None,
    device: str | None,
    id_col: str | None,
    label_col: str | None,
    case_col: str | None,
    strict: bool | None,
    ensemble_all: bool,
    ignore_slide_identity: bool | None,
) -> None:
    """Predict slides with trained checkpoints, out of fold; per-tile scores for heatmaps.

    Each slide of the training run is scored by the fold model that held it out, each slide the run never
    saw by the average of the fold models; predictions.csv and every score file say which (scored_by).

    Features must match the checkpoint's feature spec (encoder, dimension, tile µm/px and px).
    """
    from wsi_mil.config import load_config
    from wsi_mil.config.train import PredictConfig

    with exit_on_error():
        cfg = load_config(
            PredictConfig,
            config_path,
            {
                "device": device, "strict": strict, "ignore_slide_identity": ignore_slide_identity,
                **label_column_overrides(id_col, label_col, case_col),
            },
        )
        from wsi_mil.runs.predict import run_predict

        result = run_predict(features, list(checkpoints), out_dir, cfg, labels_csv=labels_csv, ensemble_all=ensemble_all)
    click.echo(result.table())
    click.echo(f"predictions: {result.out_dir / 'predictions.csv'}; scores: {result.out_dir / 'scores'}")
    sys.exit(result.exit_code)

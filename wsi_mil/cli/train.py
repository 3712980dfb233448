"""``wsi-mil train`` and ``wsi-mil predict``: thin click commands over :mod:`wsi_mil.training`.

Registered on the main group by ``wsi_mil.cli`` (``main.add_command(train)``, ``main.add_command(predict)``).
Heavy modules (torch, scikit-learn, h5py) are imported inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import click

__all__ = ["predict", "train"]


def _fail(exc: BaseException) -> NoReturn:
    click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
    sys.exit(2)


@click.command("train")
@click.argument("features", type=click.Path(exists=True))
@click.option("--labels", "labels_csv", required=True, type=click.Path(dir_okay=False, exists=True), help="Label CSV: slide id, label, optional case id.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run folder (checkpoints, metrics, predictions).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), default=None, help="YAML config (see configs/train.yaml).")
@click.option("--model", default=None, help="MIL model: loss_attention (default), abmil, mean, max.")
@click.option("--folds", type=int, default=None, help="Cross-validation folds (default 5).")
@click.option("--splits", "splits_csv", type=click.Path(dir_okay=False, exists=True), default=None, help="Use this splits file (slide_id,case_id,label,fold,split) instead of making folds.")
@click.option("--epochs", type=int, default=None, help="Maximum epochs per fold (default 50; early stopping on validation).")
@click.option("--lr", type=float, default=None, help="Learning rate (default 2e-4).")
@click.option("--max-instances", type=int, default=None, help="Tiles read per training bag and step (default: all).")
@click.option("--seed", type=int, default=None, help="Seed of splits, initialisation and order (default 0).")
@click.option("--device", default=None, help="auto (default), cpu or cuda[:N].")
@click.option("--id-col", default=None, help="Slide id column of the label CSV (default slide_id).")
@click.option("--label-col", default=None, help="Label column (default label).")
@click.option("--case-col", default=None, help="Case/patient column (default case_id; absent: one case per slide).")
@click.option("--strict", is_flag=True, default=None, help="Unmatched slides and NaN/Inf bags are errors, not warnings.")
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
    seed: int | None,
    device: str | None,
    id_col: str | None,
    label_col: str | None,
    case_col: str | None,
    strict: bool | None,
    overwrite: bool,
) -> None:
    """Cross-validated MIL training on feature bags (wsi-mil, CLAM or TRIDENT layout) and a label table.

    FEATURES: `wsi-mil extract` output folder (or its features/), CLAM's folder (h5_files/, pt_files/),
    or TRIDENT's features_<encoder>/ folder.
    """
    from wsi_mil.config import load_config
    from wsi_mil.config.train import TrainConfig
    from wsi_mil.errors import WsiMilError

    try:
        cfg = load_config(
            TrainConfig,
            config_path,
            {
                "model.name": model,
                "splits.folds": folds,
                "training.epochs": epochs,
                "training.lr": lr,
                "training.max_instances": max_instances,
                "training.device": device,
                "seed": seed,
                "labels.id_col": id_col,
                "labels.label_col": label_col,
                "labels.case_col": case_col,
                "strict": strict,
            },
        )
        from wsi_mil.runs.train import run_train

        result = run_train(features, labels_csv, out_dir, cfg, splits_csv=splits_csv, overwrite=overwrite)
    except WsiMilError as exc:
        _fail(exc)
    click.echo(result.table())
    click.echo(f"run folder: {result.out_dir} (metrics.json, predictions.csv, fold_*/model.json)")


@click.command("predict")
@click.argument("features", type=click.Path(exists=True))
@click.option("--checkpoint", "checkpoints", required=True, multiple=True, type=click.Path(exists=True), help="model.json / model.safetensors, a fold folder, or a train run folder (all folds, averaged). Repeatable.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder: predictions.csv, scores/<slide_id>.h5.")
@click.option("--labels", "labels_csv", type=click.Path(dir_okay=False, exists=True), default=None, help="Optional label CSV: adds labels to the outputs and writes metrics.json.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), default=None, help="YAML config (see configs/predict.yaml).")
@click.option("--device", default=None, help="auto (default), cpu or cuda[:N].")
@click.option("--id-col", default=None, help="Slide id column of the label CSV (default slide_id).")
@click.option("--label-col", default=None, help="Label column (default label).")
@click.option("--case-col", default=None, help="Case/patient column (default case_id).")
@click.option("--strict", is_flag=True, default=None, help="NaN/Inf bags are errors instead of skipped slides.")
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
) -> None:
    """Predict slides with trained checkpoints (fold checkpoints are averaged); per-tile scores for heatmaps.

    Features must match the checkpoint's feature spec (encoder, dimension, tile µm/px and px).
    """
    from wsi_mil.config import load_config
    from wsi_mil.config.train import PredictConfig
    from wsi_mil.errors import WsiMilError

    try:
        cfg = load_config(
            PredictConfig,
            config_path,
            {
                "device": device,
                "strict": strict,
                "labels.id_col": id_col,
                "labels.label_col": label_col,
                "labels.case_col": case_col,
            },
        )
        from wsi_mil.runs.predict import run_predict

        result = run_predict(features, list(checkpoints), out_dir, cfg, labels_csv=labels_csv)
    except WsiMilError as exc:
        _fail(exc)
    click.echo(result.table())
    click.echo(f"predictions: {result.out_dir / 'predictions.csv'}; scores: {result.out_dir / 'scores'}")
    sys.exit(result.exit_code)

"""``wsi-mil heatmap``: a thin command over :func:`wsi_mil.runs.heatmap.run_heatmap`.

With ``--features`` it first scores the bags with :func:`wsi_mil.runs.predict.run_predict`.
Heavy modules load inside the command, so ``--help`` is instant.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from wsi_mil.cli import common


@click.command("heatmap")
@common.slides_argument
@click.option("--scores", "scores_dir", type=click.Path(file_okay=False), default=None,
              help="The --out folder of `wsi-mil predict` (it holds scores/<slide_id>.h5).")
@click.option("--features", "features_dir", type=click.Path(file_okay=False), default=None,
              help="Instead of --scores: feature bags to score first with --checkpoint (runs predict into OUT/predict).")
@click.option("--checkpoint", "checkpoints", multiple=True,
              help="For --features: " + common.CHECKPOINT_HELP)
@click.option("--labels", "labels_csv", type=click.Path(dir_okay=False, exists=True), default=None,
              help="For --features: label CSV, so captions show the true label.")
@common.out_option()
@common.config_option("heatmap")
@common.ensemble_all_option
@click.option("--score", type=click.Choice(["attention", "probability"]), default=None,
              help="probability (default): each tile's own P(class), fixed 0-1 scale, the same on every slide; "
              "or attention.")
@click.option("--scale", "attention_scale", type=click.Choice(["rank", "fixed"]), default=None,
              help="Attention scale: fixed (default): log2(n·α), the same on every slide; or rank: percentile within "
              "each slide.")
@click.option("--class", "class_name", default=None,
              help="Class for --score probability (default: the positive class of a binary model, else the predicted class).")
@click.option("--top-k", type=int, default=None, help="Top and bottom tiles exported per slide (default 8).")
@click.option("--canvas-mpp", type=float, default=None, help="Heatmap resolution in µm/px (default: longest side --max-side-px).")
@click.option("--max-side-px", type=int, default=None, help="Longest heatmap side in pixels (default 2048).")
@click.option("--smooth-um", type=float, default=None, help="Gaussian smoothing sigma in µm (default 0: none).")
@click.option("--no-clip", is_flag=True, default=False, help="Do not clip the heatmap to the tissue mask.")
@click.option("--ignore-slide-identity", is_flag=True, default=False,
              help="Draw scores over a slide file whose fingerprint differs from the one they were made from "
              "(a re-scanned slide), with a warning; by default such a slide is refused.")
@common.slide_options(
    mpp_override_help="Level-0 µm/px for every slide (default: the slide µm/px recorded in the scores).",
    mpp_override_csv_help="CSV slide_id,mpp.",
)
def heatmap(
    slides: tuple[str, ...],
    scores_dir: str | None,
    features_dir: str | None,
    checkpoints: tuple[str, ...],
    labels_csv: str | None,
    out_dir: str,
    config_path: str | None,
    ensemble_all: bool,
    score: str | None,
    attention_scale: str | None,
    class_name: str | None,
    top_k: int | None,
    canvas_mpp: float | None,
    max_side_px: int | None,
    smooth_um: float | None,
    no_clip: bool,
    ignore_slide_identity: bool,
    backend: str | None,
    mpp_override: float | None,
    mpp_override_csv: str | None,
) -> None:
    """Heatmaps from stored tile scores: figure, top tiles, QuPath GeoJSON per slide, and OUT/index.html.

    SLIDES: folders, globs, files, or a CSV with a 'path' column. Slides are matched to score files by
    slide id. Features are never re-extracted.
    """
    from wsi_mil.config import load_config
    from wsi_mil.config.heatmap import HeatmapConfig
    from wsi_mil.errors import InputError
    from wsi_mil.runs.heatmap import run_heatmap
    from wsi_mil.runs.slide_loop import discover_slides

    with common.exit_on_error():
        if (scores_dir is None) == (features_dir is None):
            raise InputError("Give either --scores PREDICT_OUT, or --features DIR with --checkpoint CKPT.")
        if features_dir is not None and not checkpoints:
            raise InputError("--features needs --checkpoint CKPT (the checkpoint(s) of `wsi-mil train`).")
        cfg = load_config(
            HeatmapConfig,
            config_path,
            {
                "score": score,
                "attention_scale": attention_scale,
                "class_name": class_name,
                "top_k": top_k,
                "canvas_mpp": canvas_mpp,
                "max_side_px": max_side_px,
                "smooth_sigma_um": smooth_um,
                "clip_to_tissue": False if no_clip else None,
                "ignore_slide_identity": True if ignore_slide_identity else None,
                **common.slide_overrides(backend, mpp_override, mpp_override_csv),
            },
        )
        paths = discover_slides(list(slides))
        if features_dir is not None:
            scores_dir = str(
                _predict_first(Path(features_dir), [Path(c) for c in checkpoints], Path(out_dir), labels_csv, ensemble_all)
            )
        result = run_heatmap(paths, str(scores_dir), Path(out_dir), cfg)
    click.echo(result.text())
    if result.index_html is not None:
        click.echo(f"review page: {result.index_html}")
    click.echo(f"manifest: {Path(out_dir) / 'manifest.csv'}")
    sys.exit(result.exit_code)


def _predict_first(
    features_dir: Path, checkpoints: list[Path], out_dir: Path, labels_csv: str | None, ensemble_all: bool
) -> Path:
    """Score the feature bags with the predict library function into ``OUT/predict``; return that folder."""
    from wsi_mil.runs.predict import run_predict

    predict_out = out_dir / "predict"
    result = run_predict(features_dir, checkpoints, predict_out, labels_csv=labels_csv, ensemble_all=ensemble_all)
    click.echo(result.table())
    return predict_out

"""``wsi-mil pipeline``: a thin command over :func:`wsi_mil.runs.pipeline.run_pipeline`."""

from __future__ import annotations

import sys

import click

from wsi_mil.cli.common import device_option, exit_on_error, out_option, prefer_huge_pages


@click.command("pipeline")
@click.argument("config_path", required=False, type=click.Path(dir_okay=False, exists=True))
@out_option("Output folder (overrides 'out').", required=False)
@click.option("--slides", multiple=True, help="The user's slides instead of the sample cohort: folder, glob, CSV or file (repeatable; needs --labels).")
@click.option("--labels", "labels_csv", type=click.Path(dir_okay=False), default=None, help="Label CSV of --slides.")
@device_option("auto, cpu or cuda[:N] for every stage.")
def pipeline(config_path: str | None, out_dir: str | None, slides: tuple[str, ...], labels_csv: str | None, device: str | None) -> None:
    """Sample data or a cohort through extract -> train (CV) -> predict -> heatmap, from one config.

    CONFIG: YAML with out, sample_data or slides + labels, and one section per stage taking the keys
    of configs/<stage>.yaml (see configs/pipeline.yaml; default: the sample cohort). Rerun to resume.
    """
    prefer_huge_pages()
    from wsi_mil.runs.pipeline import load_pipeline_config, run_pipeline

    with exit_on_error(resumable=True):
        cfg = load_pipeline_config(config_path, out=out_dir, slides=list(slides), labels=labels_csv, device=device)
        result = run_pipeline(cfg)
    click.echo(result.text())
    sys.exit(result.exit_code)

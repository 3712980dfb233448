"""``wsi-mil sample-data``: a thin command over :func:`wsi_mil.demo.cohort.build_sample_cohort`."""

from __future__ import annotations

from pathlib import Path

import click

from wsi_mil.cli.common import exit_on_error


@click.command("sample-data")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--slides", "n_slides", type=click.IntRange(2, 500), default=12, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--broken", is_flag=True, help="Also write a folder of broken slides (OUT/broken) for trying failure handling.")
def sample_data(out: str, n_slides: int, seed: int, broken: bool) -> None:
    """Build the sample cohort of pyramidal slides from real tissue: OUT/slides, labels.csv, annotations/."""
    from wsi_mil.demo.broken import write_broken_slides
    from wsi_mil.demo.cohort import build_sample_cohort

    with exit_on_error():
        info = build_sample_cohort(Path(out), n_slides=n_slides, seed=seed)
        if broken:
            write_broken_slides(Path(out) / "broken")
    state = "built" if info.built else "already complete, reused"
    click.echo(
        f"sample cohort ({state}): {len(info.slides)} slides ({len(info.positives)} tumor, {len(info.negatives)} normal) "
        f"in {info.slides_dir}; labels {info.labels_csv}; lesion annotations {info.annotations_dir}"
    )

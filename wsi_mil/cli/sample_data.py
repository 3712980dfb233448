"""``wsi-mil sample-data``: a thin command over :func:`wsi_mil.demo.cohort.build_sample_cohort`."""

from __future__ import annotations

from pathlib import Path

import click

from wsi_mil.cli.common import exit_on_error


@click.command("sample-data")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--slides", "n_slides", type=click.IntRange(2, 500), default=12, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--lesion-share",
    type=click.FloatRange(0.003, 0.5),
    default=None,
    help="Lesion area as a fraction of each tumor slide's tissue, 0.003 to 0.5 (0.01 = 1 %), with no "
    "lesion size floor. Default: drawn per slide in 0.035-0.088, each lesion at least about 250 x 250 µm.",
)
@click.option(
    "--lesions-per-slide",
    type=click.IntRange(1, 8),
    default=None,
    help="Separate lesions on each tumor slide (1 to 8), splitting the share. Default: 1 to 3, drawn per slide.",
)
@click.option(
    "--lesion-kind",
    type=click.Choice(["ihc", "he"]),
    default="ihc",
    show_default=True,
    help="ihc: lesions of brown IHC tissue (colour alone finds them); he: lesions of H&E carcinoma in H&E "
    "skin, colour-matched and stained alike (only the tissue's look tells them apart).",
)
@click.option("--broken", is_flag=True, help="Also write a folder of broken slides (OUT/broken) for trying failure handling.")
def sample_data(
    out: str,
    n_slides: int,
    seed: int,
    lesion_share: float | None,
    lesions_per_slide: int | None,
    lesion_kind: str,
    broken: bool,
) -> None:
    """Build the sample cohort of pyramidal slides from real tissue: OUT/slides, labels.csv, annotations/."""
    from wsi_mil.demo.broken import write_broken_slides
    from wsi_mil.demo.cohort import build_sample_cohort

    with exit_on_error():
        info = build_sample_cohort(
            Path(out),
            n_slides=n_slides,
            seed=seed,
            lesion_share=lesion_share,
            lesions_per_slide=lesions_per_slide,
            lesion_kind="he" if lesion_kind == "he" else "ihc",
        )
        if broken:
            write_broken_slides(Path(out) / "broken")
    state = "built" if info.built else "already complete, reused"
    click.echo(
        f"sample cohort ({state}): {len(info.slides)} slides ({len(info.positives)} tumor, {len(info.negatives)} normal) "
        f"in {info.slides_dir}; labels {info.labels_csv}; lesion annotations {info.annotations_dir}"
    )

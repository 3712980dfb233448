"""The ``wsi-mil`` click group: logging set-up and the registration of every command.

Each command lives in its own module and imports heavy modules (torch, timm, OpenSlide, h5py)
inside its body, so ``--help`` is instant. This package is the only place that configures logging
or prints.
"""

from __future__ import annotations

import logging

import click

from wsi_mil.cli.encoders import encoders
from wsi_mil.cli.extract import extract
from wsi_mil.cli.heatmap import heatmap
from wsi_mil.cli.pipeline import pipeline
from wsi_mil.cli.sample_data import sample_data
from wsi_mil.cli.tiles import tiles
from wsi_mil.cli.train import predict, train
from wsi_mil.cli.view import view


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("tifffile", "PIL", "matplotlib", "h5py", "timm"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="wsi-mil")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def main(verbose: int, quiet: bool) -> None:
    """Whole-slide MIL: sample-data -> tiles / extract -> train -> predict -> heatmap (or all: pipeline); view."""
    _setup_logging(verbose, quiet)


for _command in (sample_data, tiles, encoders, extract, train, predict, heatmap, pipeline, view):
    main.add_command(_command)

"""The ``wsi-mil`` command line: thin commands over library functions.

Heavy modules (torch, timm, OpenSlide) are imported inside the commands, so ``--help`` is instant.
This is the only place that configures logging or prints.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])
logger = logging.getLogger("wsi_mil.cli")


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("tifffile", "PIL", "matplotlib", "h5py", "timm"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def slide_options(func: F) -> F:
    """Options shared by every command that opens slides."""
    options = [
        click.option("--backend", type=click.Choice(["auto", "openslide", "tiffslide"]), default=None, help="Slide reader (default auto: OpenSlide, tiffslide fallback)."),
        click.option("--mpp-override", type=float, default=None, help="Level-0 µm/px for every slide (when metadata lacks it or is wrong)."),
        click.option("--mpp-override-csv", type=click.Path(dir_okay=False), default=None, help="CSV slide_id,mpp with per-slide level-0 µm/px."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def encoder_from_env(config_path: str | None, encoder: str | None, weights: str | None) -> tuple[str | None, str | None]:
    """Encoder and weights: flags, else the ``--config`` file, else ``$WSI_MIL_ENCODER``/``$WSI_MIL_WEIGHTS``.

    The Docker image sets the variables to weights baked into it; a flag or config file still wins.
    """
    if encoder is not None or weights is not None:
        return encoder, weights
    if config_path is not None:
        from wsi_mil.config import read_yaml

        data = read_yaml(config_path)
        if data.get("encoder") is not None or data.get("weights") is not None:
            return None, None
    return os.environ.get("WSI_MIL_ENCODER") or None, os.environ.get("WSI_MIL_WEIGHTS") or None


def _fail(exc: BaseException) -> None:
    click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="wsi-mil")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def main(verbose: int, quiet: bool) -> None:
    """Whole-slide MIL: sample-data -> tiles / extract -> train -> predict -> heatmap (or all: pipeline)."""
    _setup_logging(verbose, quiet)


@main.command("sample-data")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--slides", "n_slides", type=click.IntRange(2, 500), default=12, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--broken", is_flag=True, help="Also write a folder of broken slides (OUT/broken) for trying failure handling.")
def sample_data(out: str, n_slides: int, seed: int, broken: bool) -> None:
    """Build the sample cohort of pyramidal slides from real tissue: OUT/slides, labels.csv, annotations/."""
    from wsi_mil.demo.cohort import build_sample_cohort, write_broken_slides
    from wsi_mil.errors import WsiMilError

    try:
        info = build_sample_cohort(Path(out), n_slides=n_slides, seed=seed)
        if broken:
            write_broken_slides(Path(out) / "broken")
    except WsiMilError as exc:
        _fail(exc)
    state = "built" if info.built else "already complete, reused"
    click.echo(
        f"sample cohort ({state}): {len(info.slides)} slides ({len(info.positives)} tumor, {len(info.negatives)} normal) "
        f"in {info.slides_dir}; labels {info.labels_csv}; lesion annotations {info.annotations_dir}"
    )


@main.command("tiles")
@click.argument("slides", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), default=None, help="YAML config (see configs/tiles.yaml).")
@click.option("--mpp", type=float, default=None, help="Tile resolution in µm/px (default 0.5).")
@click.option("--tile-px", type=int, default=None, help="Tile side in pixels at --mpp (default 256).")
@click.option("--stride-px", type=int, default=None, help="Grid stride in pixels at --mpp (default: tile side).")
@click.option("--min-tissue", type=float, default=None, help="Minimum tissue fraction per tile (default 0.5).")
@slide_options
def tiles(
    slides: tuple[str, ...],
    out_dir: str,
    config_path: str | None,
    mpp: float | None,
    tile_px: int | None,
    stride_px: int | None,
    min_tissue: float | None,
    backend: str | None,
    mpp_override: float | None,
    mpp_override_csv: str | None,
) -> None:
    """Find tissue and lay a tile grid at an exact µm/px: coords HDF5, QC thumbnails, GeoJSON, manifest.

    SLIDES: folders, globs, files, or a CSV with a 'path' column.
    """
    from wsi_mil.config import TilesConfig, load_config
    from wsi_mil.errors import WsiMilError
    from wsi_mil.runs.slide_loop import discover_slides
    from wsi_mil.runs.tiles import run_tiles

    try:
        cfg = load_config(
            TilesConfig,
            config_path,
            {
                "tiling.mpp": mpp,
                "tiling.tile_px": tile_px,
                "tiling.stride_px": stride_px,
                "tiling.min_tissue_fraction": min_tissue,
                "slide.backend": backend,
                "slide.mpp_override": mpp_override,
                "slide.mpp_override_csv": mpp_override_csv,
            },
        )
        paths = discover_slides(list(slides))
        summary = run_tiles(paths, Path(out_dir), cfg)
    except WsiMilError as exc:
        _fail(exc)
    click.echo(summary.text())
    click.echo(f"manifest: {Path(out_dir) / 'manifest.csv'}")
    sys.exit(summary.exit_code)


@main.command("extract")
@click.argument("slides", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), default=None, help="YAML config (see configs/extract.yaml).")
@click.option("--encoder", default=None, help="resnet50_trunc, tf_efficientnet_lite0 (default; offline ImageNet weights) or a timm model id. Default also from $WSI_MIL_ENCODER.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help="Local weight file (.safetensors or .pth, loaded safely). Default also from $WSI_MIL_WEIGHTS (weights baked into the Docker image).")
@click.option("--random-init", is_flag=True, default=None, help="Random encoder weights (testing only; recorded in the output).")
@click.option("--mpp", type=float, default=None, help="Tile resolution in µm/px (default 0.5).")
@click.option("--tile-px", type=int, default=None, help="Tile side in pixels at --mpp (default 256).")
@click.option("--device", default=None, help="auto (default), cpu or cuda[:N].")
@click.option("--batch-size", type=int, default=None, help="Tiles per batch (default 32).")
@click.option("--workers", type=int, default=None, help="0: read tiles in series; N: N loader processes; default: a reading thread on CPU, up to 8 processes on CUDA.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default=None, help="auto: bf16 where the hardware has it, else fp32.")
@click.option("--feature-dtype", type=click.Choice(["float32", "float16"]), default=None)
@click.option("--compile", "compile_", is_flag=True, default=None, help="torch.compile the encoder.")
@click.option("--skip-unreadable-tiles", is_flag=True, default=None, help="Skip and count corrupt tiles instead of failing the slide.")
@click.option("--shard", default=None, help="I/N: process shard I of N (default from SLURM_ARRAY_TASK_ID / JOB_COMPLETION_INDEX).")
@click.option("--overwrite", is_flag=True, help="Recompute everything, also in a folder made with another config.")
@click.option("--allow-failed-slides", is_flag=True, help="Exit 0 when slides failed (each is explained in manifest.csv): for job chains (Slurm afterok, Kubernetes Jobs) that go on with the good slides.")
@slide_options
def extract(
    slides: tuple[str, ...],
    out_dir: str,
    config_path: str | None,
    encoder: str | None,
    weights: str | None,
    random_init: bool | None,
    mpp: float | None,
    tile_px: int | None,
    device: str | None,
    batch_size: int | None,
    workers: int | None,
    precision: str | None,
    feature_dtype: str | None,
    compile_: bool | None,
    skip_unreadable_tiles: bool | None,
    shard: str | None,
    overwrite: bool,
    allow_failed_slides: bool,
    backend: str | None,
    mpp_override: float | None,
    mpp_override_csv: str | None,
) -> None:
    """Tile the tissue at an exact µm/px and stream frozen-encoder features into OUT/features/<id>.h5.

    Resumable: rerun the same command after a crash or Ctrl-C; complete slides are skipped.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch allocates: huge pages, fewer faults
    from wsi_mil.config import ExtractConfig, load_config
    from wsi_mil.errors import WsiMilError
    from wsi_mil.runs.slide_loop import discover_slides, parse_shard

    try:
        encoder, weights = encoder_from_env(config_path, encoder, weights)
        cfg = load_config(
            ExtractConfig,
            config_path,
            {
                "encoder": encoder,
                "weights": weights,
                "random_init": random_init,
                "tiling.mpp": mpp,
                "tiling.tile_px": tile_px,
                "device": device,
                "batch_size": batch_size,
                "workers": workers,
                "precision": precision,
                "feature_dtype": feature_dtype,
                "compile": compile_,
                "skip_unreadable_tiles": skip_unreadable_tiles,
                "slide.backend": backend,
                "slide.mpp_override": mpp_override,
                "slide.mpp_override_csv": mpp_override_csv,
            },
        )
        shard_ix = parse_shard(shard)
        paths = discover_slides(list(slides))
        from wsi_mil.runs.extract import run_extract

        summary = run_extract(paths, Path(out_dir), cfg, overwrite=overwrite, shard=shard_ix)
    except WsiMilError as exc:
        _fail(exc)
    except KeyboardInterrupt:  # before or after the batch (inside it the summary records it)
        click.echo("interrupted: rerun the same command to resume", err=True)
        sys.exit(130)
    click.echo(summary.text())
    click.echo(f"features: {Path(out_dir) / 'features'}  manifest: {Path(out_dir) / 'manifest.csv'}")
    code = summary.exit_code
    if code == 1 and allow_failed_slides:
        click.echo(f"{len(summary.failed)} slide(s) failed (see the manifest); exit 0 (--allow-failed-slides)", err=True)
        code = 0
    sys.exit(code)


@main.command("pipeline")
@click.argument("config_path", required=False, type=click.Path(dir_okay=False, exists=True))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Output folder (overrides 'out').")
@click.option("--slides", multiple=True, help="The user's slides instead of the sample cohort: folder, glob, CSV or file (repeatable; needs --labels).")
@click.option("--labels", "labels_csv", type=click.Path(dir_okay=False), default=None, help="Label CSV of --slides.")
@click.option("--device", default=None, help="auto, cpu or cuda[:N] for every stage.")
def pipeline(config_path: str | None, out_dir: str | None, slides: tuple[str, ...], labels_csv: str | None, device: str | None) -> None:
    """Sample data or a cohort through extract -> train (CV) -> predict -> heatmap, from one config.

    CONFIG: YAML with out, sample_data or slides + labels, and one section per stage taking the keys
    of configs/<stage>.yaml (see configs/pipeline.yaml; default: the sample cohort). Rerun to resume.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from wsi_mil.errors import WsiMilError
    from wsi_mil.runs.pipeline import load_pipeline_config, run_pipeline

    try:
        cfg = load_pipeline_config(config_path, out=out_dir, slides=list(slides), labels=labels_csv, device=device)
        result = run_pipeline(cfg)
    except WsiMilError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        click.echo("interrupted: rerun the same command to resume", err=True)
        sys.exit(130)
    click.echo(result.text())
    sys.exit(result.exit_code)


def _register_commands() -> None:
    from wsi_mil.cli.heatmap import heatmap
    from wsi_mil.cli.train import predict, train

    for command in (train, predict, heatmap):
        main.add_command(command)


_register_commands()


def run() -> None:  # pragma: no cover - console entry for `python -m wsi_mil`
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

"""``wsi-mil extract``: a thin command over :func:`wsi_mil.runs.extract.run_extract` (torch loads inside it)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from wsi_mil.cli.common import (
    config_option,
    device_option,
    encoder_from_env,
    encoder_tile_size_options,
    exit_on_error,
    out_option,
    prefer_huge_pages,
    slide_options,
    slide_overrides,
    slides_argument,
)


@click.command("extract")
@slides_argument
@out_option()
@config_option("extract")
@click.option("--encoder", default=None, help="A preset (`wsi-mil encoders` lists them: uni, virchow2, h_optimus_0, ...; default tf_efficientnet_lite0, offline ImageNet weights) or a timm model id. Default also from $WSI_MIL_ENCODER.")
@click.option("--weights", type=click.Path(), default=None, help="Local weight file (.safetensors or .pth, loaded safely) or a downloaded hub snapshot folder; needed for file-only presets (ctranspath) and gated models without hub access. Default also from $WSI_MIL_WEIGHTS (weights baked into the Docker image).")
@click.option("--random-init", is_flag=True, default=None, help="Random encoder weights (testing only; recorded in the output).")
@encoder_tile_size_options
@device_option()
@click.option("--devices", default=None, help="One extract process per device on this node, each with a disjoint part of the slides (and of --shard's) and its share of --workers: all (every visible GPU) or a list such as cuda:0,cuda:1 (an entry may repeat: cpu,cpu). Instead of --device.")
@click.option("--batch-size", type=int, default=None, help="Tiles per forward pass (default 8 on CPU, 128 on CUDA).")
@click.option("--workers", type=int, default=None, help="0: read tiles in series; N: N tile-reading processes for the whole run; default: a reading thread on CPU, up to 8 processes on CUDA.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default=None, help="auto: the encoder preset's default (`wsi-mil encoders --json`): bf16 where the hardware has it, else fp32; EfficientNet-Lite0 stays fp32 on CPU.")
@click.option("--feature-dtype", type=click.Choice(["float32", "float16"]), default=None)
@click.option("--compile", "compile_", is_flag=True, default=None, help="torch.compile the encoder.")
@click.option("--cpu-fusion/--no-cpu-fusion", default=None, help="On the CPU, fuse a CNN encoder's convolutions with their batch norm, ReLU and residual add (default on; features change by rounding only).")
@click.option("--skip-unreadable-tiles", is_flag=True, default=None, help="Skip and count corrupt tiles instead of failing the slide.")
@click.option("--shard", default=None, help="I/N: process shard I of N (default from SLURM_ARRAY_TASK_ID / JOB_COMPLETION_INDEX).")
@click.option("--no-claims", is_flag=True, help="Take no per-slide flock claims (for file systems without flock); every process writing to OUT must then be given other slides (--shard, a Slurm array, a Kubernetes indexed job, --devices).")
@click.option("--overwrite", is_flag=True, help="Recompute everything, also in a folder made with another config.")
@click.option("--allow-failed-slides", is_flag=True, help="Exit 0 when slides failed (each is explained in manifest.csv): for job chains (Slurm afterok, Kubernetes Jobs) that go on with the good slides.")
@slide_options()
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
    devices: str | None,
    batch_size: int | None,
    workers: int | None,
    precision: str | None,
    feature_dtype: str | None,
    compile_: bool | None,
    cpu_fusion: bool | None,
    skip_unreadable_tiles: bool | None,
    shard: str | None,
    no_claims: bool,
    overwrite: bool,
    allow_failed_slides: bool,
    backend: str | None,
    mpp_override: float | None,
    mpp_override_csv: str | None,
) -> None:
    """Tile the tissue at an exact µm/px and stream frozen-encoder features into OUT/features/<id>.h5.

    Resumable: rerun the same command after a crash or Ctrl-C; complete slides are skipped.
    """
    prefer_huge_pages()
    from wsi_mil.config import ExtractConfig, load_config
    from wsi_mil.runs.slide_loop import discover_slides, parse_shard

    # Ctrl-C before or after the batch exits here (inside the batch the summary records it).
    with exit_on_error(resumable=True):
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
                "devices": devices,
                "batch_size": batch_size,
                "workers": workers,
                "precision": precision,
                "feature_dtype": feature_dtype,
                "compile": compile_,
                "cpu_fusion": cpu_fusion,
                "skip_unreadable_tiles": skip_unreadable_tiles,
                **slide_overrides(backend, mpp_override, mpp_override_csv),
            },
        )
        shard_ix = parse_shard(shard)
        paths = discover_slides(list(slides))
        from wsi_mil.runs.devices import extract_on_devices

        summary = extract_on_devices(paths, Path(out_dir), cfg, overwrite=overwrite, shard=shard_ix, claims=not no_claims)
    click.echo(summary.text())
    click.echo(f"features: {Path(out_dir) / 'features'}  manifest: {Path(out_dir) / 'manifest.csv'}")
    code = summary.exit_code
    if summary.crashed:
        click.echo(f"{len(summary.crashed)} process(es) ended without reporting their slides: exit 1 (rerun to resume)", err=True)
    elif code == 1 and allow_failed_slides:
        click.echo(f"{len(summary.failed)} slide(s) failed (see the manifest); exit 0 (--allow-failed-slides)", err=True)
        code = 0
    sys.exit(code)

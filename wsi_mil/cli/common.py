"""What the commands share: option decorators, config overrides, the encoder fallback and the error path.

Every command turns errors into exit codes with :func:`exit_on_error`, and an option that several
commands take with the same meaning is declared once here. Only light modules are imported.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from wsi_mil.errors import WsiMilError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_ERROR = 2
"""Exit code of a command stopped by a :class:`WsiMilError` (bad input, config or checkpoint)."""
EXIT_INTERRUPTED = 130
"""Exit code of a resumable command stopped by Ctrl-C (128 + SIGINT)."""


@contextmanager
def exit_on_error(*, resumable: bool = False) -> Iterator[None]:
    """The one path from an error to a message on stderr and an exit code.

    A :class:`WsiMilError` prints ``error: <class>: <message>`` and exits :data:`EXIT_ERROR`. In a
    ``resumable`` command (a rerun resumes it), Ctrl-C prints how to resume and exits
    :data:`EXIT_INTERRUPTED`; elsewhere it goes on to click, which prints "Aborted!" and exits 1.
    """
    try:
        yield
    except WsiMilError as exc:
        click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        if not resumable:
            raise
        click.echo("interrupted: rerun the same command to resume", err=True)
        sys.exit(EXIT_INTERRUPTED)


def _apply(func: F, decorators: list[Callable[[F], F]]) -> F:
    """``func`` under ``decorators``, the first one outermost (so listed first in ``--help``)."""
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


# --- arguments and options ------------------------------------------------------------------------
def slides_argument(func: F) -> F:
    """SLIDES: folders, globs, files, or a CSV with a 'path' column (one or more)."""
    return click.argument("slides", nargs=-1, required=True)(func)


def features_argument(func: F) -> F:
    """FEATURES: a folder of feature bags (wsi-mil, CLAM or TRIDENT layout)."""
    return click.argument("features", type=click.Path(exists=True))(func)


def out_option(help_text: str = "Output folder.", *, required: bool = True) -> Callable[[F], F]:
    """``--out`` (parameter ``out_dir``): the folder a command writes into."""
    return click.option("--out", "out_dir", required=required, type=click.Path(file_okay=False), help=help_text)


def config_option(stage: str) -> Callable[[F], F]:
    """``--config`` (parameter ``config_path``): the stage's YAML config, documented in ``configs/<stage>.yaml``."""
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, exists=True),
        default=None,
        help=f"YAML config (see configs/{stage}.yaml).",
    )


def device_option(help_text: str = "auto (default), cpu or cuda[:N].") -> Callable[[F], F]:
    """``--device``: where torch runs."""
    return click.option("--device", default=None, help=help_text)


def tile_size_options(func: F) -> F:
    """``--mpp`` and ``--tile-px``: the tile grid's resolution and tile side."""
    return _apply(
        func,
        [
            click.option("--mpp", type=float, default=None, help="Tile resolution in µm/px (default 0.5)."),
            click.option("--tile-px", type=int, default=None, help="Tile side in pixels at --mpp (default 256)."),
        ],
    )


def encoder_tile_size_options(func: F) -> F:
    """``--mpp`` and ``--tile-px`` of commands that encode tiles: the encoder preset's unless given."""
    preset = "the encoder preset's; `wsi-mil encoders` lists them, 0.5 and 256 for other timm ids"
    return _apply(
        func,
        [
            click.option("--mpp", type=float, default=None, help=f"Tile resolution in µm/px (default {preset})."),
            click.option(
                "--tile-px", type=int, default=None,
                help="Tile side in pixels at --mpp (default the encoder preset's). A value that contradicts "
                "the preset is a warning naming both.",
            ),
        ],
    )


def slide_options(
    *,
    mpp_override_help: str = "Level-0 µm/px for every slide (when metadata lacks it or is wrong).",
    mpp_override_csv_help: str = "CSV slide_id,mpp with per-slide level-0 µm/px.",
) -> Callable[[F], F]:
    """``--backend``, ``--mpp-override`` and ``--mpp-override-csv``: how every command that opens slides opens them.

    Pass the result's values to :func:`slide_overrides`.
    """

    def decorate(func: F) -> F:
        return _apply(
            func,
            [
                click.option(
                    "--backend",
                    type=click.Choice(["auto", "openslide", "tiffslide"]),
                    default=None,
                    help="Slide reader (default auto: OpenSlide, tiffslide fallback).",
                ),
                click.option("--mpp-override", type=float, default=None, help=mpp_override_help),
                click.option("--mpp-override-csv", type=click.Path(dir_okay=False), default=None, help=mpp_override_csv_help),
            ],
        )

    return decorate


def label_column_options(*, case_col_help: str) -> Callable[[F], F]:
    """``--id-col``, ``--label-col`` and ``--case-col``: the columns of the label CSV.

    Pass the result's values to :func:`label_column_overrides`.
    """

    def decorate(func: F) -> F:
        return _apply(
            func,
            [
                click.option("--id-col", default=None, help="Slide id column of the label CSV (default slide_id)."),
                click.option("--label-col", default=None, help="Label column (default label)."),
                click.option("--case-col", default=None, help=case_col_help),
            ],
        )

    return decorate


# --- config overrides -----------------------------------------------------------------------------
def slide_overrides(backend: str | None, mpp_override: float | None, mpp_override_csv: str | None) -> dict[str, Any]:
    """Config overrides of :func:`slide_options` (``None``: keep the config file's value)."""
    return {"slide.backend": backend, "slide.mpp_override": mpp_override, "slide.mpp_override_csv": mpp_override_csv}


def label_column_overrides(id_col: str | None, label_col: str | None, case_col: str | None) -> dict[str, Any]:
    """Config overrides of :func:`label_column_options` (``None``: keep the config file's value)."""
    return {"labels.id_col": id_col, "labels.label_col": label_col, "labels.case_col": case_col}


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


def prefer_huge_pages() -> None:
    """Ask torch for transparent huge pages (fewer page faults); call before torch allocates."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


CHECKPOINT_HELP = (
    "model.json / model.safetensors, a fold folder, or a train run folder. Out of fold: a slide the run listed "
    "is scored by the fold model that held it out, a slide it never saw by the folds' average. Repeatable."
)


def ensemble_all_option(func: F) -> F:
    """``--ensemble-all``: every checkpoint scores every slide (deployment); in-sample metrics are marked."""
    return click.option(
        "--ensemble-all", is_flag=True, default=False,
        help="Score every slide with every checkpoint, also slides they trained on (for deployment on new "
        "slides); metrics over such slides are marked IN-SAMPLE, with a warning.",
    )(func)


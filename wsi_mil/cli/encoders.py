"""``wsi-mil encoders``: the encoder presets as a table (or JSON), and whether each one's weights are here."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from wsi_mil.cli.common import config_option, encoder_from_env, exit_on_error


def _configured_weights(config_path: str | None) -> tuple[str | None, str | None]:
    """The (encoder, weights) pair configured for ``extract``: its ``--config`` file, else the environment."""
    encoder, weights = encoder_from_env(config_path, None, None)
    if config_path is not None and encoder is None and weights is None:
        from wsi_mil.config import read_yaml

        data = read_yaml(config_path)
        encoder, weights = data.get("encoder") or "tf_efficientnet_lite0", data.get("weights")
    return encoder, weights


def _where(preset: Any, configured: tuple[str | None, str | None]) -> tuple[str, str | None]:
    """Where this machine has the preset's weights: (``file``/``hub cache``/``release cache``/``package``/``no``, path)."""
    from wsi_mil.features.hub import cached_preset_weights

    encoder, weights = configured
    if encoder == preset.name and weights and Path(weights).expanduser().exists():
        return "file", str(Path(weights).expanduser())
    path = cached_preset_weights(preset)
    if path is None:
        return "no", None
    kind = {"hub": "hub cache", "timm": "hub cache", "url": "release cache", "package": "package"}[preset.weights.kind]
    return kind, str(path)


@click.command("encoders")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per preset (a list), for scripts.")
@config_option("extract")
def encoders(as_json: bool, config_path: str | None) -> None:
    """List the encoder presets: feature dimension, the tile µm/px and side each expects, pooling,
    licence, whether access is gated, and whether its weights are on this machine (hub cache, release
    cache, package, or the file configured by --config / $WSI_MIL_ENCODER + $WSI_MIL_WEIGHTS).

    Use a name with `wsi-mil extract --encoder NAME`; its tile size and preprocessing come with it.
    """
    with exit_on_error():
        from wsi_mil.features.presets import list_presets

        configured = _configured_weights(config_path)
        rows = []
        for preset in list_presets():
            kind, path = _where(preset, configured)
            rows.append((preset, kind, path))
        if as_json:
            click.echo(json.dumps([{**p.summary(), "weights_here": kind, "weights_path": path} for p, kind, path in rows], indent=2))
            return
        header = ("name", "dim", "µm/px", "px", "pooling", "licence", "gated", "weights here")
        table = [header] + [
            (
                p.name, str(p.feature_dim), f"{p.tile_mpp:g}", str(p.tile_px), p.pooling, p.licence.split(" (")[0],
                "gated" if p.gated else "-", kind if path is None or kind == "package" else f"{kind}: {_short(path)}",
            )
            for p, kind, path in rows
        ]  # fmt: skip
        widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
        for r in table:
            click.echo("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
        click.echo(
            "\nGated models: request access on the model page, then `hf auth login` (or HF_TOKEN), or pass "
            "--weights FILE. `wsi-mil encoders --json` gives every value with its preprocessing and source."
        )


def _short(path: str) -> str:
    home = os.path.expanduser("~")
    return "~" + path[len(home) :] if path.startswith(home + os.sep) else path

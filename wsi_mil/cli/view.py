"""``wsi-mil view``: a thin command over :class:`wsi_mil.viewer.ViewerServer`.

Starts a local web server on the run's slides and outputs, prints its URL and serves until Ctrl-C; it
opens no browser. Heavy modules load inside the command, so ``--help`` is instant.
"""

from __future__ import annotations

import click

from wsi_mil.cli import common


@click.command("view")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--slides", "slides", multiple=True,
              help="Slide files, folders, globs or a CSV with a 'path' column, when they moved since the run "
              "(matched by slide id; repeatable). Default: the paths the run's manifest recorded.")
@click.option("--annotations", "annotations", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder of ground-truth <slide_id>.geojson files (QuPath) to draw over the slides "
              "(default: the sample cohort's annotations/ in a pipeline run).")
@click.option("--port", type=int, default=None, help="Port to listen on (default 8765; 0: any free port).")
@click.option("--host", default=None,
              help="Interface to listen on (default 127.0.0.1: this machine only). Any other host is logged as "
              "a warning: whoever reaches it sees the slides.")
@click.option("--layer", type=click.Choice(["probability", "attention", "rank"]), default=None,
              help="The overlay a slide opens with (default probability: P(class) per tile, fixed 0-1 scale).")
@click.option("--top-k", type=int, default=None, help="Tiles in the top and bottom galleries (default 8).")
@common.config_option("view")
@click.option("--backend", type=click.Choice(["auto", "openslide", "tiffslide"]), default=None,
              help="Slide reader (default auto: OpenSlide, tiffslide fallback).")
def view(
    run_dir: str,
    slides: tuple[str, ...],
    annotations: str | None,
    port: int | None,
    host: str | None,
    layer: str | None,
    top_k: int | None,
    config_path: str | None,
    backend: str | None,
) -> None:
    """A zoomable viewer of RUN_DIR's slides with the model's evidence on top, in your browser.

    RUN_DIR: the --out folder of `wsi-mil pipeline`, `wsi-mil heatmap` or (with --slides) `wsi-mil predict`.
    Prints the address to open; serves until Ctrl-C.
    """
    from wsi_mil.config import load_config
    from wsi_mil.config.view import ViewConfig
    from wsi_mil.runs.slide_loop import discover_slides
    from wsi_mil.viewer import Catalog, ViewerServer
    from wsi_mil.viewer.assets import openseadragon_dir

    with common.exit_on_error():
        openseadragon_dir()  # refuse to start without the browser component, saying how to install it
        cfg = load_config(ViewConfig, config_path, {"host": host, "port": port, "layer": layer, "top_k": top_k,
                                                    "backend": backend})
        paths = discover_slides(list(slides)) if slides else None
        catalog = Catalog.open(run_dir, slides=paths, annotations=annotations, backend=cfg.backend)
        server = ViewerServer(catalog, cfg)
    n_ok = len(catalog.viewable_ids())
    click.echo(f"wsi-mil view: {len(catalog.entries)} slides ({n_ok} with scores) from {run_dir}")
    click.echo(f"open {server.url} in a browser (Ctrl-C stops the server)")
    try:
        server.run()
    except KeyboardInterrupt:
        pass

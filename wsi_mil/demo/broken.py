"""The broken-slide zoo: one file per way a slide can fail, plus one good slide, for tests and the demo.

``write_broken_slides(out_dir)`` writes zero-byte, not a slide, truncated, no mpp, no tissue and
corrupt-JPEG-tile-inside-tissue slides and one good slide, and ``broken_slides.json`` describing them
(:data:`BROKEN_SLIDES`, and the level-0 box of the corrupt tile).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import cv2
import numpy as np

from wsi_mil.demo.pyramid import write_pyramid
from wsi_mil.demo.render import PYRAMID_DOWNSAMPLES, glass, render_slide
from wsi_mil.demo.sources import load_sources
from wsi_mil.store.atomic import atomic_path, atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

#: What each zoo slide is and what opening/reading it should do.
BROKEN_SLIDES: dict[str, str] = {
    "zero_bytes": "broken_zero_bytes.svs: empty file; open_slide raises SlideOpenError",
    "not_a_slide": "broken_not_a_slide.svs: a text file; open_slide raises SlideOpenError",
    "truncated": "broken_truncated.svs: a good slide cut at 50 % of its bytes; open_slide raises SlideOpenError",
    "no_mpp": "broken_no_mpp.tif: a pyramidal TIFF without resolution tags; open_slide raises MissingMPPError",
    "no_tissue": "blank_no_tissue.svs: a valid slide of empty glass; tissue detection finds nothing",
    "good": "good_tissue.svs: a valid real-tissue slide at 0.5 µm/px, for folders mixing good and broken slides",
    "corrupt_tile": "broken_corrupt_tile.svs: opens, but one level-0 JPEG tile inside tissue is corrupt; "
    "reading it raises SlideReadError (see broken_slides.json for the tile box)",
}


def write_broken_slides(out_dir: str | os.PathLike[str], seed: int = 0) -> dict[str, Path]:
    """Write the broken-slide zoo into ``out_dir`` and return ``{kind: path}`` (kinds: :data:`BROKEN_SLIDES`).

    Also writes ``broken_slides.json`` describing each file, including the level-0 box
    ``[x, y, w, h]`` of the corrupt tile. The good parts are small real-tissue slides at 0.5 µm/px.
    """
    import tifffile

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sources = load_sources()
    rng = np.random.default_rng([seed, 4242])
    paths = {
        "zero_bytes": out / "broken_zero_bytes.svs",
        "not_a_slide": out / "broken_not_a_slide.svs",
        "truncated": out / "broken_truncated.svs",
        "no_mpp": out / "broken_no_mpp.tif",
        "no_tissue": out / "blank_no_tissue.svs",
        "corrupt_tile": out / "broken_corrupt_tile.svs",
        "good": out / "good_tissue.svs",
    }
    atomic_write_bytes(paths["zero_bytes"], b"")
    atomic_write_text(
        paths["not_a_slide"],
        "This is not a slide: a text file with a slide suffix, as left by a failed download.\n",
    )
    tissue = render_slide(sources, 0.5, (1024.0, 1024.0), 0, rng)
    level0 = tissue.work  # 0.5 µm/px: work resolution is level 0

    with atomic_path(paths["truncated"]) as tmp:
        write_pyramid(tmp, level0, mpp=0.5, fmt="svs", downsamples=PYRAMID_DOWNSAMPLES)
        payload = tmp.read_bytes()
        tmp.write_bytes(payload[: len(payload) // 2])
    with atomic_path(paths["no_mpp"]) as tmp:
        write_pyramid(tmp, level0, mpp=None, fmt="tif", downsamples=PYRAMID_DOWNSAMPLES)
    with atomic_path(paths["good"]) as tmp:
        write_pyramid(tmp, level0, mpp=0.5, fmt="svs", downsamples=PYRAMID_DOWNSAMPLES)
    blank = glass(level0.shape[0], level0.shape[1], rng)
    with atomic_path(paths["no_tissue"]) as tmp:
        write_pyramid(tmp, blank, mpp=0.5, fmt="svs", downsamples=PYRAMID_DOWNSAMPLES)

    tile_px = 256
    h0, w0 = level0.shape[:2]
    truth_full = cv2.resize(
        tissue.tissue_truth.astype(np.uint8), (w0, h0), interpolation=cv2.INTER_NEAREST
    ).astype(bool)
    tiles_x = math.ceil(w0 / tile_px)
    best, best_share = 0, -1.0
    for ty in range(math.ceil(h0 / tile_px)):
        for tx in range(tiles_x):
            share = float(
                truth_full[ty * tile_px : (ty + 1) * tile_px, tx * tile_px : (tx + 1) * tile_px].mean()
            )
            if share > best_share + 1e-9:
                best, best_share = ty * tiles_x + tx, share
    with atomic_path(paths["corrupt_tile"]) as tmp:
        write_pyramid(tmp, level0, mpp=0.5, fmt="svs", downsamples=PYRAMID_DOWNSAMPLES, tile_px=tile_px)
        with tifffile.TiffFile(tmp) as tif:
            offset = int(tif.pages[0].dataoffsets[best])
            count = int(tif.pages[0].databytecounts[best])
        with open(tmp, "r+b") as fh:
            fh.seek(offset)
            fh.write(b"\x00" * min(count, 64))
    box = [(best % tiles_x) * tile_px, (best // tiles_x) * tile_px, tile_px, tile_px]
    meta = {
        "slides": {kind: {"file": p.name, "what": BROKEN_SLIDES[kind]} for kind, p in paths.items()},
        "corrupt_tile_box_level0_px": box,
        "corrupt_tile_tissue_share": round(best_share, 3),
    }
    atomic_write_text(out / "broken_slides.json", json.dumps(meta, indent=1))
    logger.info("wrote the broken-slide zoo (%d files) into %s", len(paths), out)
    return paths

"""Exports for reuse and review: top/bottom tiles (PNG + CSV + contact sheet) and labelled images.

Everything is written atomically (temp file in the destination folder, then ``os.replace``).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from wsi_mil.slide import Slide
from wsi_mil.store import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)


def encode_png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - OpenCV always encodes uint8 RGB
        raise ValueError("could not encode a PNG")
    return buf.tobytes()


def write_png(path: str | os.PathLike[str], rgb: np.ndarray) -> Path:
    return atomic_write_bytes(path, encode_png(rgb))


# --- top and bottom tiles ------------------------------------------------------------------------------
def rank_tiles(values: np.ndarray, attention: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``k`` highest and ``k`` lowest values (ties: higher/lower attention, then tile order)."""
    n = values.shape[0]
    k = min(k, n)
    if k == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty
    order = np.arange(n)
    top = np.lexsort((order, -attention, -values))[:k]
    bottom = np.lexsort((order, attention, values))[:k]
    return top.astype(np.int64), bottom.astype(np.int64)


@dataclass(frozen=True)
class ExportedTile:
    rank: int
    index: int
    x: int
    y: int
    score: float
    file: str  # relative to the slide's output folder


def export_tiles(
    slide: Slide,
    out_dir: Path,
    which: str,
    indices: np.ndarray,
    coords: np.ndarray,
    values: np.ndarray,
    extra_columns: Mapping[str, np.ndarray],
    tile_px: int,
    mpp: float,
) -> tuple[list[ExportedTile], list[np.ndarray]]:
    """Read each tile at the model's µm/px, write ``<which>_tiles/<which>_NN_x..._y....png`` and
    ``<which>_tiles.csv`` (rank, x, y, score, extra columns, file); return the rows and the images."""
    folder = out_dir / f"{which}_tiles"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):  # a rerun with other scores must not leave stale tiles behind
        old.unlink()
    rows: list[ExportedTile] = []
    images: list[np.ndarray] = []
    for rank, idx in enumerate(indices.tolist(), start=1):
        x, y = int(coords[idx, 0]), int(coords[idx, 1])
        image = slide.read_region_mpp((x, y), (tile_px, tile_px), mpp)
        name = f"{which}_tiles/{which}_{rank:02d}_x{x}_y{y}.png"
        write_png(out_dir / name, image)
        rows.append(ExportedTile(rank, int(idx), x, y, float(values[idx]), name))
        images.append(image)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["rank", "x", "y", "score", *extra_columns.keys(), "tile_index", "file"])
    for row in rows:
        extras = [f"{float(col[row.index]):.6g}" for col in extra_columns.values()]
        writer.writerow([row.rank, row.x, row.y, f"{row.score:.6g}", *extras, row.index, row.file])
    atomic_write_text(out_dir / f"{which}_tiles.csv", buf.getvalue())
    return rows, images


def contact_sheet(
    images: Sequence[np.ndarray], rows: Sequence[ExportedTile], title: str, *, cell_px: int = 200, columns: int = 4
) -> np.ndarray:
    """A grid of tiles, each captioned with its rank and score, under a title line (RGB uint8)."""
    from PIL import Image, ImageDraw, ImageFont

    font_path = _font_path()
    font = ImageFont.truetype(font_path, 15) if font_path else ImageFont.load_default()
    small = ImageFont.truetype(font_path, 12) if font_path else ImageFont.load_default()
    title_font = ImageFont.truetype(font_path, 18) if font_path else ImageFont.load_default()
    n = max(1, len(images))
    cols = min(columns, n) if images else columns
    rows_n = (n + cols - 1) // cols
    pad, label_h, title_h = 6, 38, 30
    width = cols * (cell_px + pad) + pad
    height = title_h + rows_n * (cell_px + label_h + pad) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 5), title, fill=(0, 0, 0), font=title_font)
    if not images:
        draw.text((pad, title_h + 10), "no tiles", fill=(176, 0, 0), font=title_font)
    for i, (image, row) in enumerate(zip(images, rows, strict=True)):
        r, c = divmod(i, cols)
        x = pad + c * (cell_px + pad)
        y = title_h + r * (cell_px + label_h + pad)
        tile = cv2.resize(image, (cell_px, cell_px), interpolation=cv2.INTER_AREA)
        sheet.paste(Image.fromarray(tile), (x, y))
        draw.text((x + 2, y + cell_px + 2), f"#{row.rank}   {row.score:.5g}", fill=(0, 0, 0), font=font)
        draw.text((x + 2, y + cell_px + 20), f"x {row.x}, y {row.y}", fill=(90, 90, 90), font=small)
    return np.asarray(sheet)


def label_image(rgb: np.ndarray, text: str) -> np.ndarray:
    """``rgb`` faded, with ``text`` written large in its centre (e.g. "no tiles")."""
    from PIL import Image, ImageDraw, ImageFont

    faded = (rgb.astype(np.float32) * 0.35 + 255 * 0.65).astype(np.uint8)
    image = Image.fromarray(faded)
    draw = ImageDraw.Draw(image)
    size = max(12, image.width // 12)
    font_path = _font_path()
    font = ImageFont.truetype(font_path, size) if font_path else ImageFont.load_default()
    box = draw.textbbox((0, 0), text, font=font)
    xy = ((image.width - (box[2] - box[0])) // 2, (image.height - (box[3] - box[1])) // 2)
    draw.text(xy, text, fill=(176, 0, 0), font=font)
    return np.asarray(image)


def _font_path() -> str | None:
    try:
        from matplotlib import font_manager

        return str(font_manager.findfont("DejaVu Sans", fallback_to_default=True))
    except Exception:  # pragma: no cover - matplotlib ships DejaVu Sans
        return None

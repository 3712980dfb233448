"""Heatmap arrays of one slide (``<heatmap out>/<slide_id>/heatmap.h5``), written by ``wsi-mil heatmap``.

Schema:

* ``heatmap`` float32 ``(H, W)``: the painted canvas, NaN where no tile was scored (gzip 4);
* ``tile_count`` int32 ``(H, W)``: tiles covering each canvas pixel (gzip 4);
* ``tissue`` uint8 ``(H, W)``, optional: the tissue mask on the canvas (gzip 4);
* ``coords`` int64 ``(N, 2)``: level-0 top-left (x, y) of each tile; ``scores`` float32 ``(N,)``: the value
  painted for each tile; ``attention`` float32 ``(N,)``; ``instance_probabilities`` float32 ``(N, K)``;
* attributes: ``slide_id``, ``slide_dimensions`` (JSON ``[w, h]``, level 0), ``slide_mpp``, ``tile_mpp``,
  ``tile_px``, ``footprint_px``, ``canvas_mpp``, ``downsample`` (``downsample_x``, ``downsample_y``),
  ``score_kind``, ``score_label``, ``score_scale``, ``vmin``, ``vmax``, ``colormap``, ``class_name``,
  ``class_names`` (JSON), ``smooth_sigma_um``, ``tissue_clipped``. Lists and mappings are stored as JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import BagFileError
from wsi_mil.store.atomic import as_output_error, atomic_path
from wsi_mil.store.hdf5 import open_for_reading, written_by

REQUIRED_DATASETS = ("heatmap", "tile_count", "coords", "scores", "attention", "instance_probabilities")


def write_heatmap_h5(
    path: str | os.PathLike[str],
    *,
    heatmap: np.ndarray,
    count: np.ndarray,
    tissue: np.ndarray | None,
    coords: np.ndarray,
    scores: np.ndarray,
    attention: np.ndarray,
    instance_probabilities: np.ndarray,
    attrs: Mapping[str, Any],
) -> Path:
    """``heatmap`` (float32 canvas, NaN where unscored), ``tile_count``, ``tissue``, ``coords``, ``scores``
    (the painted value per tile), ``attention``, ``instance_probabilities`` and the canvas attributes."""
    import h5py

    dest = Path(path)
    try:
        with atomic_path(dest) as tmp, h5py.File(tmp, "w") as fh:
            fh.create_dataset("heatmap", data=heatmap.astype(np.float32), compression="gzip", compression_opts=4)
            fh.create_dataset("tile_count", data=count.astype(np.int32), compression="gzip", compression_opts=4)
            if tissue is not None:
                fh.create_dataset("tissue", data=tissue.astype(np.uint8), compression="gzip", compression_opts=4)
            fh.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(-1, 2))
            fh.create_dataset("scores", data=np.asarray(scores, np.float32))
            fh.create_dataset("attention", data=np.asarray(attention, np.float32))
            fh.create_dataset("instance_probabilities", data=np.asarray(instance_probabilities, np.float32))
            for key, value in attrs.items():
                fh.attrs[key] = value if not isinstance(value, list | tuple | dict) else json.dumps(value)
    except OSError as exc:
        raise as_output_error(exc, dest.parent) from exc
    return dest


@dataclass(frozen=True, eq=False)
class HeatmapArrays:
    """The contents of a ``heatmap.h5`` file."""

    heatmap: np.ndarray
    tile_count: np.ndarray
    tissue: np.ndarray | None
    coords: np.ndarray
    scores: np.ndarray
    attention: np.ndarray
    instance_probabilities: np.ndarray
    attrs: dict[str, Any]


def read_heatmap_h5(path: str | os.PathLike[str]) -> HeatmapArrays:
    """Read and check a ``heatmap.h5`` file; :class:`BagFileError` naming the file when it is inconsistent."""
    p = Path(path)
    with open_for_reading(p, str(p), "Run `wsi-mil heatmap` again.") as fh:
        missing = [d for d in REQUIRED_DATASETS if d not in fh]
        if missing:
            raise BagFileError(
                f"{p} lacks {', '.join(missing)}: it was not written by `wsi-mil heatmap` ({written_by(fh.attrs)})."
            )
        arrays = {d: np.asarray(fh[d][()]) for d in REQUIRED_DATASETS}
        tissue = np.asarray(fh["tissue"][()]) if "tissue" in fh else None
        attrs: dict[str, Any] = {}
        for key, value in fh.attrs.items():
            value = value.decode("utf-8") if isinstance(value, bytes) else value
            if isinstance(value, str) and key in ("slide_dimensions", "class_names"):
                value = json.loads(value)
            attrs[key] = value.item() if isinstance(value, np.generic) else value
    n = arrays["coords"].shape[0]
    if arrays["heatmap"].shape != arrays["tile_count"].shape or (
        tissue is not None and tissue.shape != arrays["heatmap"].shape
    ):
        raise BagFileError(f"{p}: the canvas arrays differ in shape; run `wsi-mil heatmap` again.")
    if arrays["scores"].shape != (n,) or arrays["attention"].shape != (n,) or arrays["instance_probabilities"].shape[0] != n:
        raise BagFileError(f"{p}: per-tile arrays do not match its {n} coordinates; run `wsi-mil heatmap` again.")
    return HeatmapArrays(tissue=tissue, attrs=attrs, **arrays)

"""GeoJSON objects for QuPath: tissue, lesion and tile polygons in level-0 pixels (one writer, one reader).

Schema (every file wsi-mil writes: ``tissue/<id>.geojson``, ``<id>/tiles.geojson``, the sample cohort's
``annotations/<id>.geojson``): a ``FeatureCollection`` of ``Feature`` objects, each with

* ``geometry``: a ``Polygon`` in level-0 pixels (x right, y down); rings are closed, exteriors
  counter-clockwise and holes clockwise (RFC 7946 winding), at least 4 positions each;
* ``properties``:

  - ``objectType``: ``"annotation"`` (tissue, lesions) or ``"detection"`` (tiles);
  - ``name``: ``"<kind> <n>"``, 1-based (``tissue 3``, ``lesion 1``; tiles: ``tile <row>``, 0-based rows
    of the bag and score files, so a tile can be looked up);
  - ``classification``: ``{"name": ..., "color": [r, g, b]}`` (annotations);
  - ``isLocked``: ``false`` (annotations);
  - ``measurements``: ``{name: number}`` (tiles: scores; QuPath lists them in its measurement table);
  - further plain properties where a kind needs one (tissue: ``area_um2``).

* an optional feature ``id`` (a stable UUID for lesions).

QuPath imports these files with File > Import objects (or drag and drop).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import InputError
from wsi_mil.store.atomic import atomic_write_text

__all__ = [
    "annotation",
    "feature_collection",
    "read_polygons",
    "tile_detections_text",
    "write_geojson",
]


def annotation(
    rings: Sequence[Sequence[Sequence[float]]],
    *,
    name: str,
    class_name: str,
    color: Sequence[int],
    feature_id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One annotation ``Feature`` (tissue piece, lesion): closed ``rings``, exterior first."""
    feature: dict[str, Any] = {"type": "Feature"}
    if feature_id is not None:
        feature["id"] = feature_id
    feature["geometry"] = {"type": "Polygon", "coordinates": [[list(p) for p in ring] for ring in rings]}
    feature["properties"] = {
        "objectType": "annotation",
        "name": name,
        "classification": {"name": class_name, "color": [int(c) for c in color]},
        "isLocked": False,
        **extra,
    }
    return feature


def feature_collection(features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": list(features)}


def _strings(values: np.ndarray) -> list[str]:
    """Numbers as short JSON literals (6 significant digits)."""
    return [format(v, ".6g") for v in np.asarray(values, np.float64).tolist()]


def tile_detections_text(
    coords: np.ndarray, footprint_px: float, measurements: Mapping[str, np.ndarray], object_type: str = "detection"
) -> str:
    """The GeoJSON text of tile squares (level-0 top-left ``coords``, side ``footprint_px``) with their
    scores as ``measurements``; written as text for speed (a slide has up to ~10^5 tiles)."""
    f = float(footprint_px)
    xy = np.asarray(coords, np.float64).reshape(-1, 2)
    x0, y0 = _strings(xy[:, 0]), _strings(xy[:, 1])
    x1, y1 = _strings(xy[:, 0] + f), _strings(xy[:, 1] + f)
    names = [json.dumps(k) + ":" for k in measurements]
    columns = [_strings(v) for v in measurements.values()]
    head = '{"type":"Feature","geometry":{"type":"Polygon","coordinates":[[['
    props = ']]]},"properties":{"objectType":' + json.dumps(object_type) + ',"name":"tile '
    parts = []
    for i in range(xy.shape[0]):
        a, b, c, d = x0[i], y0[i], x1[i], y1[i]
        meas = ",".join([n + col[i] for n, col in zip(names, columns, strict=True)])
        parts.append(
            f"{head}{a},{b}],[{c},{b}],[{c},{d}],[{a},{d}],[{a},{b}{props}{i}\",\"measurements\":{{{meas}}}}}}}"
        )
    return '{"type":"FeatureCollection","features":[\n' + ",\n".join(parts) + "\n]}\n"


def write_geojson(
    path: str | os.PathLike[str], collection: Mapping[str, Any] | str, *, indent: int | None = None
) -> Path:
    """Write a FeatureCollection (a mapping, or text from :func:`tile_detections_text`) atomically."""
    if isinstance(collection, str):
        text = collection
    elif indent is None:
        text = json.dumps(collection, separators=(",", ":")) + "\n"
    else:
        text = json.dumps(collection, indent=indent)
    return atomic_write_text(path, text)


def read_polygons(path: str | os.PathLike[str]) -> list[tuple[list[np.ndarray], dict[str, Any]]]:
    """``[(rings, properties), ...]`` of the polygons in a GeoJSON file (``MultiPolygon`` parts separately).

    Rings are ``(n, 2)`` float64 arrays in the file's units (level-0 pixels for wsi-mil's files).
    Raises :class:`InputError` naming the file when it is not a GeoJSON FeatureCollection of polygons.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{p} is not a readable GeoJSON file ({exc}); export it again from QuPath.") from exc
    features = data.get("features") if isinstance(data, dict) else data if isinstance(data, list) else None
    if not isinstance(features, list):
        raise InputError(f"{p}: expected a GeoJSON FeatureCollection (or a list of features).")
    out: list[tuple[list[np.ndarray], dict[str, Any]]] = []
    for i, feature in enumerate(features):
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        if not isinstance(geometry, dict):
            raise InputError(f"{p}: feature {i} has no geometry.")
        props = dict(feature.get("properties") or {})
        kind, coordinates = geometry.get("type"), geometry.get("coordinates")
        if kind not in ("Polygon", "MultiPolygon") or coordinates is None:
            continue  # points and lines carry no area
        polygons: list[Any] = [coordinates] if kind == "Polygon" else list(coordinates)
        for polygon in polygons:
            try:
                rings = [np.asarray(ring, np.float64).reshape(-1, 2) for ring in polygon]
            except (TypeError, ValueError) as exc:
                raise InputError(f"{p}: feature {i} has malformed coordinates ({exc}).") from exc
            out.append((rings, props))
    return out
